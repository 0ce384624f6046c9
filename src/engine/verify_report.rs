//! The report of an online verify ([`crate::engine::online_verify`]): what status shows of it.
//! Kept apart from the verify itself so that the engine, which holds the report, does not
//! depend on the code that runs the verify (that code depends on the engine).

use std::sync::Mutex;

/// Where a verify is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyState {
    #[default]
    Running,
    Done,
    Failed,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OnlineVerify {
    pub state: VerifyState,
    pub regions: u64,
    pub compared: u64,
    /// Dirty or busy when their turn came, or written while being read.
    pub skipped: u64,
    pub mismatches: u64,
    /// First mismatching regions (region numbers).
    pub mismatched: Vec<u64>,
    pub granularity: u64,
    pub bytes_compared: u64,
    /// Regions not read because source and target both hold a hole there.
    pub holes: u64,
    pub bytes_skipped: u64,
    pub elapsed_secs: f64,
    pub error: Option<String>,
}

/// The verify runs of one engine (one at a time).
#[derive(Default)]
pub struct Verifier {
    report: Mutex<Option<OnlineVerify>>,
}

impl Verifier {
    pub fn report(&self) -> Option<OnlineVerify> {
        self.lock().clone()
    }
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Option<OnlineVerify>> {
        // A panic in the verify thread leaves a report that is at worst stale.
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }
}
