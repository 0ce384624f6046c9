//! Starting a device's daemon: `add` and `recover`, in the style of rublk / ublksrv.
//!
//! `add` forks a daemon before any ublk object or thread exists (START_DEV must come from the
//! process that serves the queues). The daemon reports over a pipe: `ID n` once the device
//! exists, `LIVE n` once it serves I/O, `FAIL text` otherwise; EOF means it died. The parent
//! prints the device's JSON only after `LIVE`, and on any failure deletes the half-made device,
//! so nothing is left behind. Every wait is bounded.

use crate::daemon::saved::{find_by_name, DeviceEntry, SavedConfig, SavedHook};
use crate::daemon::RUN_DIR;
use crate::daemon::device;
use crate::engine::{CopyConfig, Engine, PairOptions, Settings, SyncMode};
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

pub(crate) fn uerr(what: &'static str) -> impl Fn(libublk::UblkError) -> Error {
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
pub(crate) fn ublk_number(id: u32) -> Result<i32> {
    i32::try_from(id)
        .map_err(|_| Error::config(format!("{id} is not a device id: ublk device ids are 0 to {}", i32::MAX)))
}

/// What a daemon serves: the device, the pair, and what `add` chose for it (a recovered daemon
/// takes them from the device's saved configuration).
struct Serving {
    ctrl: UblkCtrl,
    pair: PairOptions,
    name: String,
    /// `None`: the settings `add` was given.
    settings: Option<Settings>,
    switched: bool,
    affinity: QueueAffinity,
    /// `None`: the default under RUN_DIR.
    event_log: Option<PathBuf>,
}

/// Opens the device to recover and reads the pair it was serving from its saved configuration.
fn prepare_recover(id: u32, direct: crate::io::backing::DirectMode) -> Result<Serving> {
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
    let saved = SavedConfig::for_recovery(id, data)?;
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
        tls: saved.tls.unwrap_or_default(),
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
    Ok(Serving { ctrl, pair, name, settings, switched, affinity, event_log: saved.event_log })
}


/// A panic in any thread of the daemon ends the process, as a kill does: the device then waits,
/// quiesced, for `recover`, which resumes from the bitmap (docs/crash-safety.md). Unwinding
/// would end only the thread, and a process whose mirror thread or a queue thread is gone goes
/// on serving, silently not mirroring or with requests that never complete. (The state lock
/// aborts on poisoning for the same reason: Engine::lock.) The message and backtrace are
/// logged first by the default hook.
fn fail_stop_on_panic() {
    let log_it = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        log_it(info);
        log::error!("panic in the daemon ({info}); aborting: the device waits for `ublk-mirror recover`");
        std::process::abort();
    }));
}

/// Runs in the daemon: opens the pair, adds (or recovers) the device and serves it until it is
/// stopped. Returns when the device is gone.
fn serve(opts: &AddOptions, recover: Option<u32>, report: &mut Report) -> Result<()> {
    fail_stop_on_panic();
    let Serving { ctrl, pair, name, settings: saved, switched, affinity, event_log } = match recover {
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
            Serving {
                ctrl,
                pair,
                name,
                settings: None,
                switched: false,
                affinity: opts.affinity,
                event_log: opts.event_log.clone(),
            }
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
    let event_log = event_log.unwrap_or(events_path);
    if let Err(e) = engine.events().open(&event_log) {
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
        event_log: Some(event_log.clone()),
        tls: (!pair.tls.is_empty()).then(|| pair.tls.clone()),
    };
    // Fails only for a path that is not UTF-8 (JSON has no other way to hold it).
    let data = serde_json::to_value(&saved).map_err(|e| Error::config(format!("saving the device's configuration: {e}")))?;
    // After a switchover there is nothing to mirror.
    let mirror = target.map(|(t, _)| device::spawn_mirror(engine.clone(), t, copy));
    let stop_control = Arc::new(AtomicBool::new(false));
    let info = serde_json::json!({
        "dev_id": id, "bdev": format!("/dev/ublkb{id}"), "name": name,
        "source": pair.source, "target": pair.target, "bitmap": pair.bitmap,
        "event_log": event_log,
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
        // Room for two operations per tag (a write-blocking write goes to source and target,
        // an early-shipped one too) and the queue's bitmap flush and timer. An early-shipped
        // target write may outlive its tag, so more may be in flight at moments: a full
        // submission queue is submitted (QueueSink::push) and the kernel keeps completions that
        // overflow the completion queue (IORING_FEAT_NODROP, every kernel with ublk).
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
                if let Some(c) = ublk_number(id).ok().and_then(|n| UblkCtrl::new_simple(n).ok()) {
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
            let c = UblkCtrl::new_simple(ublk_number(id)?).map_err(uerr("open device"))?;
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

/// The ublk driver is not loaded: what to do about it.
pub(crate) fn driver_missing() -> Error {
    Error::config(
        "the ublk driver is not loaded (/dev/ublk-control is missing): run `modprobe ublk_drv` as \
         root (Linux 6.0 or newer with CONFIG_BLK_DEV_UBLK). On a machine without it, the source \
         tree's `scripts/try-in-vm.sh` runs the device in a VM",
    )
}

/// Asked of sysfs, not of libublk (which complains on stderr about a missing device).
pub(crate) fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}
