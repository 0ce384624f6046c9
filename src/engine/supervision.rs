//! The mirror thread as the engine sees it: asking it to park (its target is being replaced)
//! and what it does next, its failures and restarts, and the test fault that makes it fail.

use super::{lock_recovering, Engine};
use crate::error::Error;
use std::sync::atomic::Ordering;
use crate::io::target::BoxTarget;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How often a switchover re-wakes a mirror loop it waits to see parked.
const PARK_NUDGE: Duration = Duration::from_millis(50);
/// The longest a parking waiter sleeps without a look at its conditions: every change is
/// announced, so this only bounds the cost of a change that was not.
const PARK_SAFETY: Duration = Duration::from_secs(1);

/// What [`Engine::record_failure`] found.
pub struct Failure {
    /// The first failure after a healthy period (the pair just became degraded).
    pub first: bool,
    /// This failure made mirroring give up.
    pub give_up: bool,
    /// Failures in a row.
    pub failures: u32,
}

/// What the mirror thread does after its loop returned.
pub enum MirrorNext {
    Stop,
    Same,
    Target(BoxTarget),
}

impl Engine {
    /// Waits until the mirror thread is not running its loop (parked or gone).
    pub(super) fn wait_mirror_parked(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = lock_recovering(&self.mirror_next);
        while self.mirror_running.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // The loop may be waiting on its ring: it sees the restart once woken. Woken again
            // every PARK_NUDGE in case it was mid-pass and waits again before seeing it.
            self.wake();
            g = self.parking.wait_timeout(g, left.min(PARK_NUDGE)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Wakes every waiter on the mirror thread's parking after a change of it (made before
    /// this call, under `mirror_next`'s lock or not).
    pub(crate) fn announce_parking(&self) {
        drop(lock_recovering(&self.mirror_next));
        self.parking.notify_all();
    }

    /// The mirror thread after a failed loop: waits until `until` (for ever with `None`), or
    /// until it is asked to stop or to park for a switchover, whichever comes first.
    pub fn wait_retry_or_park(&self, until: Option<Instant>) {
        let mut g = lock_recovering(&self.mirror_next);
        while !self.mirror_should_return() {
            let left = match until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => PARK_SAFETY,
            };
            if until.is_some() && left.is_zero() {
                return;
            }
            g = self.parking.wait_timeout(g, left.min(PARK_SAFETY)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The mirror loop should return (to be parked for a target change, or to stop).
    pub fn mirror_should_return(&self) -> bool {
        self.stop_requested() || self.mirror_restart.load(Ordering::SeqCst)
    }

    /// Called by the mirror thread around its loop.
    pub fn set_mirror_running(&self, yes: bool) {
        self.mirror_running.store(yes, Ordering::SeqCst);
        self.announce_parking();
    }

    /// Called by the mirror thread after its loop returned: stop, or go on (with the same or
    /// a new target) once a switchover has decided.
    pub fn mirror_next(&self) -> MirrorNext {
        let mut g = lock_recovering(&self.mirror_next);
        loop {
            if self.stop_requested() {
                return MirrorNext::Stop;
            }
            if let Some(n) = g.take() {
                return n;
            }
            if !self.mirror_restart.load(Ordering::SeqCst) {
                // The loop returned without being asked to park: nothing else to do.
                return MirrorNext::Stop;
            }
            g = self.parking.wait_timeout(g, PARK_SAFETY).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Tests: make the mirror loop fail while `path` exists (None: never).
    pub fn set_mirror_fault(&self, path: Option<PathBuf>) {
        *lock_recovering(&self.mirror_fault) = path;
    }

    /// The test fault of [`MIRROR_FAULT_ENV`] is in force.
    pub fn mirror_fault_injected(&self) -> bool {
        lock_recovering(&self.mirror_fault).as_ref().is_some_and(|p| p.exists())
    }

    /// The test fault of [`crate::engine::PANIC_FAULT_ENV`] is in force.
    pub fn panic_injected(&self) -> bool {
        self.panic_fault.as_ref().is_some_and(|p| p.exists())
    }

    /// The mirror loop ended with `err` (not asked to): the pair is degraded and the state
    /// `failed` until a new loop starts. It counts as a failure toward `--max-retries`, like a
    /// failed copy. Returns false once mirroring has given up.
    pub fn mirror_loop_failed(&self, err: &Error, retry_in: Duration) -> bool {
        let msg = format!("mirror loop: {err}");
        let Failure { first, give_up, failures } = self.record_failure(&msg, true);
        log::error!("{msg}; {}", if give_up { "giving up".to_string() } else { format!("restarting in {retry_in:?}") });
        if first {
            self.events.emit("degraded", serde_json::json!({ "error": msg }));
        }
        self.events.emit(
            "mirror-failed",
            serde_json::json!({ "error": msg, "failures": failures, "retry_in_secs": retry_in.as_secs_f64() }),
        );
        if give_up {
            self.events.emit("stopped", serde_json::json!({ "error": msg, "failures": failures }));
        }
        self.lock().progress.gave_up.is_none()
    }

    /// Records a failure of the mirroring (a copy, a flush, or the loop itself, `loop_failed`)
    /// under one lock: the error, the failures in a row, degraded since the first, given up
    /// past `--max-retries`; write-blocking stops in the same step (see update_active_locked).
    pub fn record_failure(&self, msg: &str, loop_failed: bool) -> Failure {
        let max = self.max_retries();
        let mut g = self.lock();
        g.progress.last_error = Some(msg.to_string());
        if loop_failed {
            g.progress.loop_failed = Some(msg.to_string());
        }
        g.progress.target_failures = g.progress.target_failures.saturating_add(1);
        let first = g.progress.degraded_since.is_none();
        if first {
            g.progress.degraded_since = Some(SystemTime::now());
        }
        let give_up = crate::core::policy::gives_up(max, g.progress.target_failures) && g.progress.gave_up.is_none();
        if give_up {
            g.progress.gave_up = Some(format!("{} failures in a row; last: {msg}", g.progress.target_failures));
        }
        self.update_active_locked(&g);
        self.announce_pair_change(&g);
        Failure { first, give_up, failures: g.progress.target_failures }
    }

    /// A mirror loop is set up and about to run. After a failed one: the state leaves `failed`,
    /// and a consistent point is asked for, whose flush tells whether the target works again
    /// (it clears `degraded`; see the mirror's target_ok).
    pub fn mirror_loop_started(&self) {
        let restarted = {
            let mut g = self.lock();
            let was = g.progress.loop_failed.take();
            if was.is_some() {
                g.state.request_consistent_point();
            }
            was
        };
        if let Some(e) = restarted {
            self.events.emit("mirror-restarted", serde_json::json!({ "after": e }));
        }
    }
}
