//! Switchover: the device moves to the target (or, `--reverse`, source and target swap)
//! under live I/O, in the order docs/operations.md describes.

use super::*;

/// The longest the switchover's wait sleeps without a look at the pair: every change that
/// can make it ready is announced, so this only bounds the cost of one that was not.
const PAIR_SAFETY: Duration = Duration::from_millis(100);

impl Engine {
    /// Switchover (see [`crate::daemon::control`]): holds new writes, waits for the writes in flight
    /// and for a consistent point with nothing dirty, records the switch in the bitmap, then
    /// serves the target. With `reverse` the old source becomes the mirror's target instead of
    /// being released. Bounded by `limit`; on failure writes resume on the source.
    pub fn switchover(&self, limit: Duration, reverse: bool) -> Result<()> {
        let _one = lock_recovering(&self.switching);
        let t0 = Instant::now();
        if self.serving_target() {
            return Err(Error::config("the device serves its target already"));
        }
        let Some(new_data) = lock_recovering(&self.front_target).clone() else {
            return Err(Error::config(
                "switchover needs a target the device can serve (a file or block device)",
            ));
        };
        if reverse && new_data.size != self.size {
            return Err(Error::config(format!(
                "--reverse needs a target of the source's size: the target is {} bytes, the device {} \
                 (the old source would become the target of a device the target's size); switch over \
                 without --reverse",
                new_data.size, self.size
            )));
        }
        if self.verifier.report().is_some_and(|r| r.state == verify_report::VerifyState::Running) {
            return Err(Error::config("an online verify is running: wait for it (see `status`) and retry"));
        }
        {
            let mut g = self.lock();
            if let Some(r) = &g.progress.gave_up {
                return Err(Error::config(format!("mirroring has stopped ({r}): the target is not current")));
            }
            if g.progress.degraded_since.is_some() {
                return Err(Error::config("the target is failing (degraded): switch over once it has recovered"));
            }
            if self.paused() {
                return Err(Error::config("the mirror is paused: resume it first"));
            }
            g.write_barrier = true;
        }
        self.wake();
        let release = |why: String| -> Result<()> {
            self.lock().write_barrier = false;
            Err(Error::config(why))
        };
        // No write in flight, nothing dirty, the last consistent point current, and no
        // --on-consistent command looking at the target: the target holds every write
        // acknowledged so far, on its medium.
        // The wait sleeps on `pair_changed`, which the places that can make the pair ready (or
        // failed) announce while writes are held: the end of a write, a target flush done, the
        // end of the command, a failure (see Engine::announce_pair_change).
        let mut g = self.lock();
        loop {
            // hook_running under the lock: begin_hook sets it under the lock, and refuses once
            // write_barrier is set, so no command starts after this check finds none.
            let synced = lifecycle::switchover_ready(&g.state) && !self.hook_running();
            let failed = g.progress.degraded_since.is_some() || g.progress.gave_up.is_some();
            // A target that fails while writes are held will not catch up soon: let them go
            // now rather than at the limit.
            if failed && !synced {
                drop(g);
                return release(
                    "the target failed during the switchover (writes were held meanwhile and now resume): \
                     switch over once it has recovered"
                        .to_string(),
                );
            }
            if synced {
                break;
            }
            let left = limit.saturating_sub(t0.elapsed());
            if left.is_zero() {
                drop(g);
                return release(format!(
                    "the target did not catch up within {}s (writes were held meanwhile and now resume): \
                     try again when `status` says synced",
                    limit.as_secs()
                ));
            }
            g = self.pair_changed.wait_timeout(g, left.min(PAIR_SAFETY)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
        drop(g);
        if reverse {
            return match self.reverse_pair(new_data, t0, limit) {
                Ok(()) => Ok(()),
                Err(why) => release(why),
            };
        }
        // Durable before the switch: a crash from here on must not bring the old pair back.
        let r = lifecycle::record_switchover(&mut self.lock().state, BitmapSwitch::Over);
        if let Err(e) = r {
            return release(format!("recording the switchover in the bitmap: {e}"));
        }
        // From here every new request uses the target (reads and flushes ask serving_target
        // after taking their descriptors; writes are gated on it).
        self.serving_target.store(true, Ordering::SeqCst);
        self.lock().write_barrier = false;
        self.request_stop();
        let old = self.source();
        let drained = self.front.publish(Fds { source: -1, target: new_data.fd() }, Duration::from_secs(10));
        let mirror_gone = self.wait_mirror_parked(Duration::from_secs(10));
        if drained && mirror_gone {
            self.release_source(&old);
        } else {
            log::warn!("switchover: requests or the mirror still use the old source; it stays open until the daemon exits");
        }
        self.events.emit(
            "switched-over",
            serde_json::json!({ "held_ms": t0.elapsed().as_millis() as u64, "released": drained && mirror_gone }),
        );
        Ok(())
    }

    /// The second half of `switchover --reverse`, with writes held and the pair synced: the
    /// target becomes the device's data and the old source the mirror's target. On error
    /// nothing has changed (the caller lets writes resume on the source).
    fn reverse_pair(&self, new_source: Arc<Backing>, t0: Instant, limit: Duration) -> std::result::Result<(), String> {
        let old_source = self.source();
        let new_target = old_source
            .try_clone()
            .map_err(|e| format!("reopening the old source as the new target: {e}"))?;
        // A "same" left by an earlier attempt whose loop never returned (it saw the restart
        // called off in time) must not restart this one's loop before the pair is swapped. No
        // loop waits in mirror_next now: it only waits while a restart is asked for.
        *lock_recovering(&self.mirror_next) = None;
        // The mirror stops using the old pair (and its ring's reference to it) before anything
        // changes; it is synced, so parking it loses nothing.
        self.mirror_restart.store(true, Ordering::SeqCst);
        self.wake();
        self.announce_parking();
        // Set before the restart flag is cleared: a loop that returns for the restart (now, or
        // late, after the wait below gave up) then carries on with the same pair. Without it a
        // loop that returned just after the give-up found no next step and no restart asked,
        // and the mirror thread ended for good while the device kept serving.
        let resume_same = |why: String| {
            *lock_recovering(&self.mirror_next) = Some(MirrorNext::Same);
            self.mirror_restart.store(false, Ordering::SeqCst);
            self.announce_parking();
            why
        };
        let left = limit.saturating_sub(t0.elapsed()).max(Duration::from_secs(1));
        if !self.wait_mirror_parked(left) {
            return Err(resume_same("the mirror loop did not pause in time; writes resume on the source".into()));
        }
        // The old source becomes the target: what it holds must be on its medium first. In
        // async mode the last consistent point may have flushed the target alone (clearing
        // nothing), so the old source's last writes may be in its page cache only; the new
        // target's medium is then a crash image of the new source from the start.
        if let Err(e) = nix::unistd::fdatasync(old_source.fd()) {
            return Err(resume_same(format!("flushing the old source before it becomes the target: {}", std::io::Error::from(e))));
        }
        let h = self.pair();
        let swapped = PairIdentity {
            source: h.target,
            source_fingerprint: h.target_fingerprint,
            target: h.source,
            target_fingerprint: h.source_fingerprint,
        };
        // The new pair is recorded before any write reaches the new source: a crash from here
        // on recovers the new pair (nothing is dirty, and both hold the same data).
        if let Err(e) = lifecycle::record_switchover(&mut self.lock().state, BitmapSwitch::Reverse(swapped.clone())) {
            return Err(resume_same(format!("recording the reversed pair in the bitmap: {e}")));
        }
        *write_lock(&self.source) = new_source;
        if !self.set_front_target(old_source, Duration::from_secs(10)) {
            // Nothing was closed: a request still on the old set reads a file that holds the same data.
            log::warn!("switchover --reverse: a request held the old descriptors for 10 s");
        }
        *lock_recovering(&self.mirror_next) = Some(MirrorNext::Target(Box::new(crate::io::target::FileTarget::new(new_target))));
        self.mirror_restart.store(false, Ordering::SeqCst);
        self.announce_parking();
        self.lock().write_barrier = false;
        self.wake();
        self.events.emit(
            "switched-over",
            serde_json::json!({
                "held_ms": t0.elapsed().as_millis() as u64,
                "reverse": true,
                "source": swapped.source,
                "target": swapped.target,
            }),
        );
        Ok(())
    }

    /// After a switchover, once no request can still use it: drops this process's descriptor
    /// of the old source by pointing its number at /dev/null (the number stays valid for code
    /// that still holds it, and is not reused for another file).
    fn release_source(&self, old: &Backing) {
        match std::fs::File::open("/dev/null") {
            Ok(null) => {
                use std::os::fd::AsRawFd;
                // Onto a descriptor the engine owns (the old source's), replacing it atomically;
                // no other code closes or reuses that number while it lives.
                if let Err(e) = nix::unistd::dup2(null.as_raw_fd(), old.fd()) {
                    log::warn!("releasing the old source: {}", std::io::Error::from(e));
                }
            }
            Err(e) => log::warn!("releasing the old source: /dev/null: {e}"),
        }
    }
}
