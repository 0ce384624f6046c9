//! The device's control plane: `add`, `recover`, `del`, `list`, `status`, in the style of
//! rublk / ublksrv.
//!
//! `add` forks a daemon before any ublk object or thread exists (START_DEV must come from the
//! process that serves the queues). The daemon reports over a pipe: `ID n` once the device
//! exists, `LIVE n` once it serves I/O, `FAIL text` otherwise; EOF means it died. The parent
//! prints the device's JSON only after `LIVE`, and on any failure deletes the half-made device,
//! so nothing is left behind. Every wait is bounded.

use crate::daemon::saved::{DeviceEntry, SavedConfig, SavedHook};
use crate::daemon::RUN_DIR;
use crate::daemon::device;
use crate::engine::{CopyConfig, Engine, PairOptions, Settings, StatusState, SyncMode};
use crate::error::{Error, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{ForkResult, Pid};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::daemon::saved::{check_name, QueueAffinity, UblkState};

pub const TARGET_NAME: &str = "ublk-mirror";
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

/// Refuses early, with what to do, when the device cannot be made at all.
pub fn check_environment() -> Result<()> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err(driver_missing());
    }
    if !nix::unistd::geteuid().is_root() {
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
    direct: crate::io::backing::DirectMode,
) -> Result<(UblkCtrl, PairOptions, String, Option<Settings>, bool, QueueAffinity)> {
    let number = ublk_number(id)?;
    let old = UblkCtrl::new_simple(number)
        .map_err(|_| Error::config(format!("no ublk device {id} (see `ublk-mirror list`)")))?;
    let info = old.dev_info();
    if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(Error::config(format!("device {id} was not created with user recovery")));
    }
    let state = UblkState::from_driver(info.state);
    if state != UblkState::Quiesced {
        return Err(Error::config(format!(
            "device {id} is {state}, not waiting for a new daemon (QUIESCED): nothing to recover"
        )));
    }
    let data = old
        .get_target_data_from_json()
        .ok_or_else(|| Error::config(format!("device {id}: its saved configuration is missing")))?;
    // A configuration that does not parse is another program's.
    let saved: SavedConfig = serde_json::from_value(data).unwrap_or_default();
    let (Some(source), Some(target), Some(bitmap)) = (saved.source, saved.target, saved.bitmap) else {
        return Err(Error::config(format!("device {id} is not a ublk-mirror device")));
    };
    let name = saved.name.unwrap_or_else(|| default_name(&source));
    // The bitmap has the last word on the pair: a switchover records itself there (and
    // `--reverse` the swapped pair) before the device changes what it serves.
    let mut switched = false;
    let (source, target) = match crate::io::bitmap::Bitmap::read_header(&bitmap) {
        Ok(h) if h.state == crate::io::bitmap::BitmapState::SwitchedOver => {
            log::info!("device {id} was switched over to {}: serving it alone", h.pair.target);
            switched = true;
            (source, target)
        }
        Ok(h) if Path::new(&h.pair.source) == crate::io::bitmap::absolute(&target) && Path::new(&h.pair.target) == crate::io::bitmap::absolute(&source) => {
            log::info!("device {id}: its pair was reversed by a switchover: source {}, target {}", h.pair.source, h.pair.target);
            (target, source)
        }
        _ => (source, target),
    };
    let mut settings = saved.settings;
    if let (Some(s), Some(h)) = (settings.as_mut(), saved.on_consistent) {
        s.hook = Some(crate::engine::OnConsistentCommand::new(
            h.command,
            Duration::from_millis(h.interval_ms),
            Duration::from_millis(h.timeout_ms),
            &source,
            &target,
        ));
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
    let affinity = saved.affinity.unwrap_or(QueueAffinity::Single);
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
                    d.bdev
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
        h.set_device(id);
    }
    let saved = SavedConfig {
        name: Some(name.clone()),
        source: Some(pair.source.clone()),
        target: Some(pair.target.clone()),
        bitmap: Some(pair.bitmap.clone()),
        settings: Some(settings.clone()),
        on_consistent: copy.on_consistent.as_ref().map(SavedHook::new),
        affinity: Some(affinity),
    };
    // Fails only for a path that is not UTF-8 (JSON has no other way to hold it).
    let data = serde_json::to_value(&saved).map_err(|e| Error::config(format!("saving the device's configuration: {e}")))?;
    // After a switchover there is nothing to mirror.
    let mirror = target.map(|(t, _)| device::spawn_mirror(engine.clone(), t, copy));
    let stop_control = Arc::new(AtomicBool::new(false));
    let info = serde_json::json!({
        "dev_id": id, "bdev": format!("/dev/ublkb{id}"), "name": name,
        "source": pair.source, "target": pair.target, "bitmap": pair.bitmap,
        "event_log": opts.event_log.clone().unwrap_or(events_path.clone()),
    });
    let control = crate::daemon::control::spawn_server(id, engine.clone(), info, stop_control.clone());
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

/// The parent's side of the handshake: the device id once LIVE.
fn wait_live(child: Pid, mut pipe: File, recover: bool) -> Result<u32> {
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
        let timed_out = left == 0 || {
            let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
            // `left` is 0 to START_TIMEOUT in milliseconds, which fits.
            let limit = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            // An error (EINTR) is not a timeout: the read below finds out what happened.
            matches!(poll(&mut fds, limit), Ok(0))
        };
        if timed_out {
            // Our own child, not reaped yet: the pid is still its.
            let _ = kill(child, Signal::SIGKILL);
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
            // Reaping our own child: once it is gone /dev/ublkcN is closed and DEL cannot wait
            // on it.
            let _ = nix::sys::wait::waitpid(child, None);
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
pub fn start(opts: &AddOptions, recover: Option<u32>) -> Result<Option<DeviceEntry>> {
    check_environment()?;
    if opts.foreground {
        serve(opts, recover, &mut Report(None))?;
        return Ok(None);
    }
    std::fs::create_dir_all(RUN_DIR).map_err(|e| Error::io(format!("creating {RUN_DIR}"), e))?;
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe", e.into()))?;
    // The child puts its stdio on 0 to 2: a caller that had one of them closed would get a pipe
    // end there, and the child's dup2 would close its report channel (the parent then waiting
    // for a daemon that never reports). Both ends move to 3 and above first.
    let above_stdio = |fd: std::os::fd::OwnedFd| -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        if fd.as_raw_fd() > 2 {
            return Ok(fd);
        }
        let moved = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
            .map_err(|e| Error::io("moving the report pipe above stdio", e.into()))?;
        // SAFETY: fcntl just returned this new descriptor, owned by nothing else.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(moved) })
    };
    let (r, w) = (above_stdio(r)?, above_stdio(w)?);
    // Fork before any ublk object or thread exists: START_DEV must come from the process that
    // serves the queues, and fork copies only the calling thread.
    // SAFETY: no other thread runs code of this process here: nothing before this point starts
    // one (`up`'s lookup uses libublk's control ring, whose io_uring workers are kernel threads
    // that take no lock of ours). So the child, left with only this thread, finds the
    // allocator, the logger and every lock in a consistent state, and may run ordinary Rust
    // code: serve allocates, logs and starts the daemon's threads. With another thread running
    // here, the child could only make async-signal-safe calls until an exec.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Error::io("fork", e.into())),
        Ok(ForkResult::Child) => {
            drop(r);
            daemon_stdio(&format!("{RUN_DIR}/daemon-{}.log", std::process::id()));
            let mut report = Report(Some(File::from(w)));
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
        Ok(ForkResult::Parent { child }) => {
            // Our copy of the write end goes, so that EOF means the daemon died.
            drop(w);
            let id = wait_live(child, File::from(r), recover.is_some())?;
            let c = UblkCtrl::new_simple(id as i32).map_err(uerr("open device"))?;
            let mut d = DeviceEntry::of(&c);
            d.log = Some(format!("{RUN_DIR}/daemon-{child}.log"));
            Ok(Some(d))
        }
    }
}

/// In the daemon just forked: detaches it from the terminal and from the caller's pipes. Its
/// stdin reads /dev/null; its stdout and stderr append to `log`, or go to /dev/null when that
/// cannot be opened. Failures are ignored: the daemon reports over its pipe, not its stdio.
fn daemon_stdio(log: &str) {
    use nix::fcntl::open;
    use nix::sys::stat::Mode;
    use nix::unistd::dup2;
    let _ = nix::unistd::setsid();
    // `null` and the log's descriptor stay open after the copies: either may itself be 0 to 2
    // (when the caller had one of them closed).
    let null = open("/dev/null", OFlag::O_RDWR, Mode::empty()).ok();
    if let Some(null) = null {
        let _ = dup2(null, 0);
    }
    let log = open(log, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND, Mode::S_IRUSR | Mode::S_IWUSR).ok();
    if let Some(out) = log.or(null) {
        let _ = dup2(out, 1);
        let _ = dup2(out, 2);
    }
    // The originals above 2 are not passed on to the commands the daemon runs
    // (--on-consistent): only 0 to 2 are theirs.
    for fd in [null, log].into_iter().flatten().filter(|&fd| fd > 2) {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
}

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

/// All ublk-mirror devices (those with a bitmap in their saved configuration).
pub fn list() -> Vec<DeviceEntry> {
    let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let o = out.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        if let Ok(c) = UblkCtrl::new_simple(id as i32) {
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
    use crate::daemon::saved::ExportedDevice;
    use serde_json::json;

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
            "settings": Settings { speed: 5, busy_speed: 1, paused: false, mode: None, max_lag_ms: 0, max_retries: 3, hook: None },
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
