//! `--on-consistent CMD`: a command run after a consistent point (to snapshot the replica),
//! with the target untouched while it runs. Everything about it is here: what it is (the
//! command, its interval and timeout, its environment), and running it from the mirror loop
//! (start, reap, kill). When it may start is [`crate::core::policy::HookSchedule`]'s; the engine
//! keeps writes away from the target while it runs ([`Engine::begin_hook`]).

use super::Engine;
use crate::core::policy::{HookKill, HookSchedule, HOOK_STOP_GRACE};
use std::path::Path;
use std::time::{Duration, Instant};

/// The command: run through `sh -c` after a consistent point, at most once per `interval`,
/// with the target untouched while it runs (no copies, no write-blocking writes), so that it
/// can snapshot the replica. Killed after `timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnConsistentCommand {
    pub command: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Extra environment (device id, paths).
    pub env: Vec<(String, String)>,
}

impl OnConsistentCommand {
    /// The command for the pair `source` -> `target`: its environment names them
    /// (UBLK_MIRROR_SOURCE, UBLK_MIRROR_TARGET).
    pub fn new(command: String, interval: Duration, timeout: Duration, source: &Path, target: &Path) -> Self {
        OnConsistentCommand {
            command,
            interval,
            timeout,
            env: vec![
                ("UBLK_MIRROR_SOURCE".into(), source.display().to_string()),
                ("UBLK_MIRROR_TARGET".into(), target.display().to_string()),
            ],
        }
    }

    /// The device's id in the environment (UBLK_MIRROR_DEVICE).
    pub fn set_device(&mut self, id: u32) {
        self.env.push(("UBLK_MIRROR_DEVICE".into(), id.to_string()));
    }

    /// After `switchover --reverse`: the environment names the swapped pair.
    pub fn swap_pair(&mut self) {
        for (k, _) in self.env.iter_mut() {
            match k.as_str() {
                "UBLK_MIRROR_SOURCE" => *k = "UBLK_MIRROR_TARGET".into(),
                "UBLK_MIRROR_TARGET" => *k = "UBLK_MIRROR_SOURCE".into(),
                _ => {}
            }
        }
    }
}

/// The command as the mirror loop runs it: at most one at a time.
pub(super) struct Runner {
    command: Option<OnConsistentCommand>,
    /// The run in progress and its start.
    child: Option<(std::process::Child, Instant)>,
    schedule: HookSchedule,
}

impl Runner {
    pub(super) fn new(command: Option<OnConsistentCommand>) -> Self {
        Runner { command, child: None, schedule: HookSchedule::default() }
    }

    pub(super) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the command if one is configured, none is running and its interval has passed;
    /// not when `leaving` (the loop is on its way out: the stop would have to wait for it).
    /// From then until [`Runner::check`] reaps it, the target is left alone.
    pub(super) fn maybe_start(&mut self, engine: &Engine, leaving: bool) {
        let Some(h) = self.command.as_ref() else { return };
        if self.child.is_some() || leaving || !self.schedule.may_start(Instant::now(), h.interval) {
            return;
        }
        // No copy is in flight after a consistent flush (none may start during one), but a
        // write-blocking write that began before it may still be landing: then the next point.
        let Some(seq) = engine.begin_hook() else { return };
        let now_ms = crate::engine::events::unix_ms();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(&h.command).stdin(std::process::Stdio::null());
        cmd.env("UBLK_MIRROR_CONSISTENT_SEQ", seq.to_string()).env("UBLK_MIRROR_CONSISTENT_TIME_MS", now_ms.to_string());
        for (k, v) in &h.env {
            cmd.env(k, v);
        }
        // Its own process group, so that a kill reaches what the shell started too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        match cmd.spawn() {
            Ok(child) => {
                let now = Instant::now();
                self.child = Some((child, now));
                self.schedule.started(now);
            }
            Err(e) => {
                // Counts as a run for the interval: a spawn failing for want of processes or
                // memory would otherwise be retried, and logged, at every consistent point.
                self.schedule.started(Instant::now());
                engine.set_hook_running(false);
                log::warn!("--on-consistent: cannot run {:?}: {e}", h.command);
                engine.events().emit("on-consistent", serde_json::json!({ "seq": seq, "error": e.to_string() }));
            }
        }
    }

    /// Reaps the command (killing it after its timeout, or HOOK_STOP_GRACE after a stop) and
    /// lets copies resume.
    pub(super) fn check(&mut self, engine: &Engine, stopping: bool) {
        let timeout = self.command.as_ref().map(|h| h.timeout).unwrap_or(Duration::from_secs(60));
        // A stop (del, daemon shutdown, switchover's restart) waits for a running command, but
        // only HOOK_STOP_GRACE: `del` kills a daemon that takes 30 s, and a command left
        // running would go on reading a target the daemon no longer owns. (A stop that is
        // called off, a reverse switchover that timed out, starts no grace.)
        let running = self.child.as_ref().map(|&(_, started)| started);
        let kill = self.schedule.check(Instant::now(), running, stopping, timeout);
        let Some((child, started)) = self.child.as_mut() else { return };
        let status = match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => match kill {
                Some(HookKill::Timeout) => {
                    kill_command(child);
                    Some(format!("killed after {}s", timeout.as_secs()))
                }
                Some(HookKill::StopGrace) => {
                    kill_command(child);
                    Some(format!("killed {}s after the mirror was stopped", HOOK_STOP_GRACE.as_secs()))
                }
                None => None,
            },
            Err(e) => Some(format!("wait: {e}")),
        };
        if let Some(status) = status {
            let secs = started.elapsed().as_secs_f64();
            self.child = None;
            engine.set_hook_running(false);
            let seq = engine.lock().state.counters().consistent_points;
            engine.events().emit("on-consistent", serde_json::json!({ "seq": seq, "status": status, "secs": secs }));
            engine.wake();
        }
    }

    /// The loop ends with the command running (only an error does: a stop waits for it): it
    /// is killed, not left reading a target nobody mirrors to any more.
    /// Returns whether one was running.
    pub(super) fn kill_running(&mut self) -> bool {
        let Some((mut child, _)) = self.child.take() else { return false };
        log::warn!("mirror ended with the --on-consistent command running; killing it");
        kill_command(&mut child);
        true
    }
}

fn kill_command(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The process group the command leads (process_group(0) at spawn); the child is not
        // reaped yet, so its pid, and with it the group id, cannot be reused.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = child.kill();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::warn!("--on-consistent command {} did not exit within 2 s of SIGKILL", child.id());
}
