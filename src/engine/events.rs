//! The event log: one JSON object per line for each change of a mirror's state (synced,
//! degraded, recovered, paused, write-blocking on/off, gave up, switched over...), so that
//! monitoring can follow a mirror without polling it. The last events are also kept in memory
//! for `status`.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

const RECENT: usize = 32;

#[derive(Default)]
pub struct EventLog {
    inner: Mutex<LockedState>,
}

#[derive(Default)]
struct LockedState {
    file: Option<std::fs::File>,
    recent: VecDeque<serde_json::Value>,
    seq: u64,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// Appends events to `path` from now on (created 0600: it names devices and paths).
    pub fn open(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        self.lock().file = Some(f);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LockedState> {
        // A panic while holding this lock can only have happened mid-append: the log is still
        // usable (at worst one line is cut).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `event` with the fields of `detail` (an object) added.
    pub fn emit(&self, event: &str, detail: serde_json::Value) {
        let mut g = self.lock();
        g.seq += 1;
        let mut v = serde_json::json!({ "seq": g.seq, "time_ms": unix_ms(), "event": event });
        if let (Some(o), serde_json::Value::Object(d)) = (v.as_object_mut(), detail) {
            o.extend(d);
        }
        log::info!("event: {v}");
        if let Some(f) = g.file.as_mut() {
            // The log is for humans and monitors; the mirror does not stop for it.
            if let Err(e) = writeln!(f, "{v}") {
                log::warn!("event log: {e}");
            }
        }
        if g.recent.len() == RECENT {
            g.recent.pop_front();
        }
        g.recent.push_back(v);
    }

    pub fn recent(&self) -> Vec<serde_json::Value> {
        self.lock().recent.iter().cloned().collect()
    }
}
