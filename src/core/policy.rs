//! The mirror loop's policies: *when* it does what [`crate::core`] decides, with no I/O and no
//! clock of their own.
//!
//! - [`Backoff`] and [`gives_up`]: when a failed target is tried again, and when mirroring gives
//!   up (`--max-retries`);
//! - [`TokenBucket`], [`BusyDetector`] and [`copy_limit`]: how fast the copy runs (`speed`, and
//!   `busy_speed` while the device serves I/O);
//! - [`max_lag`]: when `--max-lag` switches write-blocking on, and off;
//! - [`ConsistentSpacing`] and [`Checkpoints`]: how far apart target flushes are;
//! - [`ShipSpacing`]: async mode's flushes: points within long epochs, idle queues, and which
//!   flushes take the source's fdatasync;
//! - [`HookSchedule`]: when the `--on-consistent` command may run, and when it is killed;
//! - [`RateMeter`]: the copy rate that status reports.
//!
//! Every decision takes the time as an argument: the mirror loop passes `Instant::now()`, the
//! tests below a simulated clock. Nothing here sleeps, reads a clock or performs I/O.

use std::time::{Duration, Instant};

/// Async mode: while writes stream into one long epoch (the device is not flushed), the loop
/// stops issuing this long after the last shipped point and flushes, so that the target gets a
/// consistent point at least this often (plus a round trip) under a sustained load.
pub const SHIP_POINT_EVERY: Duration = Duration::from_millis(250);

/// Async mode: most flushes at epoch boundaries go to the target alone; one at least this
/// often is a pair flush (with the source's fdatasync), which clears the bits of what was
/// shipped. A shorter time clears bits sooner (less to recopy after a crash) and costs a flush
/// of the source more often.
pub const SHIP_CLEAR_EVERY: Duration = Duration::from_secs(1);

/// Async mode: a queue that has shipped everything is flushed (a consistent point) once this
/// long has passed since the last point, not at once: under a load that the loop keeps up with,
/// the queue empties after nearly every batch, and a pair flush each time would put a flush of
/// the source and of the target behind every few writes.
pub const SHIP_IDLE_GAP: Duration = Duration::from_millis(100);

/// The first wait before a retry after a failure (of a copy, a flush or the loop itself).
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between retries after failures: a target that comes back is used again
/// within seconds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A failed bitmap flush of the mirror's clears is tried again after this.
pub const BITMAP_RETRY: Duration = Duration::from_secs(1);
/// The window over which the device's request rate is judged (see [`BusyDetector`]).
pub const BUSY_WINDOW: Duration = Duration::from_millis(250);
/// Requests per [`BUSY_WINDOW`] from which the device counts as busy (128 per second).
pub const BUSY_REQUESTS: u64 = 32;
/// Least time between consistent flushes while write-blocking mode is in force.
pub const CONSISTENT_GAP: Duration = Duration::from_millis(500);
/// Max-lag is checked at least this often while it is set (see [`max_lag`]).
pub const MAX_LAG_POLL: Duration = Duration::from_secs(1);
/// How long a stop waits for a running --on-consistent command before killing it.
pub const HOOK_STOP_GRACE: Duration = Duration::from_secs(10);

/// Exponential backoff between retries: the wait starts at `first` and doubles with each failure
/// up to `cap`; a success makes the next failure wait `first` again. `first == cap` makes a
/// fixed delay.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    /// The last wait; zero before the first failure and after a success.
    delay: Duration,
    /// No retry before this (the last failure's time plus its wait).
    retry_at: Option<Instant>,
}

impl Backoff {
    pub const fn new(first: Duration, cap: Duration) -> Self {
        Backoff { first, cap, delay: Duration::ZERO, retry_at: None }
    }

    /// A failure at `now`: the wait doubles (within `[first, cap]`) and the next retry is due
    /// that long after `now`. Returns the wait.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.delay = (self.delay * 2).clamp(self.first, self.cap);
        self.retry_at = Some(now + self.delay);
        self.delay
    }

    /// The target worked: the next failure waits `first` again. A retry already scheduled
    /// stays: it belongs to an operation that failed meanwhile (a copy that failed while a
    /// flush that then succeeded was in flight).
    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// When the scheduled retry is due, if one is.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// A retry is scheduled and not due yet at `now`.
    pub fn waiting(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|t| now < t)
    }

    /// At `now`, may the retry be made? False while one is scheduled and not due; otherwise the
    /// schedule is consumed (a deadline in the past would wake the loop at once, for ever).
    pub fn may_retry(&mut self, now: Instant) -> bool {
        if self.waiting(now) {
            return false;
        }
        self.retry_at = None;
        true
    }

    /// Forgets the scheduled retry (what failed has since succeeded).
    pub fn cancel(&mut self) {
        self.retry_at = None;
    }
}

/// `--max-retries`: does mirroring give up with `failures` in a row? With `max_retries` 0,
/// never; otherwise at failure `max_retries + 1` (the first failure is not a retry).
pub fn gives_up(max_retries: u32, failures: u32) -> bool {
    max_retries > 0 && failures > max_retries
}

/// The copy's bandwidth budget: a token bucket in bytes, refilled at the rate limit and holding
/// at most a quarter second's worth (or one copy buffer, so that any copy can start). A copy may
/// start while the bucket is positive and may overdraw it; the next one waits until it is
/// positive again. Over any interval the bytes started are the rate times its length, within
/// one burst. A rate of 0 is no limit: the bucket is then left as it is.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes that may start now; negative after an overdraft.
    tokens: f64,
    /// The last refill, and the rate it was made at.
    at: Instant,
    rate: u64,
}

impl TokenBucket {
    /// An empty bucket that earns from `now` on (the first refill under a limit adds what was
    /// earned since, up to one burst).
    pub fn new(now: Instant) -> Self {
        TokenBucket { tokens: 0.0, at: now, rate: 0 }
    }

    /// The most the bucket holds at `rate` with copies of up to `min_burst` bytes.
    pub fn burst(rate: u64, min_burst: u64) -> f64 {
        (rate as f64 / 4.0).max(min_burst as f64)
    }

    /// Sets the limit (bytes/s, 0 = none) for the copies that start from `now`, and adds what
    /// the limit earned since the last refill under a limit, up to the burst.
    pub fn refill(&mut self, now: Instant, rate: u64, min_burst: u64) {
        self.rate = rate;
        if rate == 0 {
            return;
        }
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * rate as f64;
        self.tokens = (self.tokens + earned).min(Self::burst(rate, min_burst));
        self.at = now;
    }

    /// May a copy start at `now`? `Err(t)`: not before `t` (at least 1 ms on, so that a wait
    /// for a fraction of a byte is not a spin).
    pub fn admit(&self, now: Instant) -> Result<(), Instant> {
        if self.rate == 0 || self.tokens > 0.0 {
            return Ok(());
        }
        let wait = Duration::from_secs_f64(-self.tokens / self.rate as f64);
        Err(now + wait.max(Duration::from_millis(1)))
    }

    /// A copy of `bytes` started (under no limit, it costs nothing).
    pub fn spend(&mut self, bytes: u64) {
        if self.rate > 0 {
            self.tokens -= bytes as f64;
        }
    }
}

/// Whether the device serves I/O: at least [`BUSY_REQUESTS`] requests began in the last
/// complete [`BUSY_WINDOW`] (md too ignores a trickle of I/O). A window much longer than
/// [`BUSY_WINDOW`] (the loop slept) is judged by its rate; a verdict holds until the next
/// window is complete.
#[derive(Clone, Debug)]
pub struct BusyDetector {
    /// The request count at the start of the current window, and that start.
    seen: u64,
    at: Instant,
    busy: bool,
}

impl BusyDetector {
    /// The first window starts at `now`, when the front end has begun `requests` requests (a
    /// loop that starts late must not count those of before as one window's).
    pub fn new(now: Instant, requests: u64) -> Self {
        BusyDetector { seen: requests, at: now, busy: false }
    }

    /// The front end has begun `requests` requests so far (a count that only grows): is the
    /// device busy at `now`?
    pub fn observe(&mut self, now: Instant, requests: u64) -> bool {
        let since = now.saturating_duration_since(self.at);
        if since >= BUSY_WINDOW {
            let scaled = requests.saturating_sub(self.seen) as f64 * BUSY_WINDOW.as_secs_f64() / since.as_secs_f64();
            self.busy = scaled >= BUSY_REQUESTS as f64;
            self.seen = requests;
            self.at = now;
        }
        self.busy
    }
}

/// The copy's rate limit now, and whether it yields to the device's I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyLimit {
    /// Bytes per second; 0 = none.
    pub rate: u64,
    pub yielding: bool,
}

/// The copy rate limit: `speed`, or `busy_speed` (when lower, or when `speed` is unlimited)
/// while the device is `busy`: the background copy yields to applications, like md's resync
/// (speed_limit_min while the array is busy) and DRBD's c-min-rate. Never while `must_catch_up`
/// (a switchover holds writes and waits for the copy, or `--max-lag` forced write-blocking: the
/// backlog only drains through the copy).
pub fn copy_limit(speed: u64, busy_speed: u64, busy: bool, must_catch_up: bool) -> CopyLimit {
    let lower = busy_speed > 0 && (speed == 0 || busy_speed < speed);
    let yielding = lower && busy && !must_catch_up;
    CopyLimit { rate: if yielding { busy_speed } else { speed }, yielding }
}

/// What `--max-lag` asks of write-blocking mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LagSwitch {
    Keep,
    /// Force write-blocking: the target has been behind for `lag`, more than the limit.
    On { lag: Duration },
    /// Release it: synced (`lag` is `None`), or the limit was removed.
    Off { lag: Option<Duration> },
}

/// Max-lag at `now`: write-blocking is forced once the target has been behind (since
/// `unsynced_since`, while not `synced`) for longer than `limit`, and released once synced or
/// once the limit is gone. `forced`: it is forced now.
pub fn max_lag(
    now: Instant,
    limit: Option<Duration>,
    forced: bool,
    synced: bool,
    unsynced_since: Option<Instant>,
) -> LagSwitch {
    let lag = if synced { None } else { unsynced_since.map(|t| now.saturating_duration_since(t)) };
    match (forced, limit, lag) {
        (false, Some(l), Some(lag)) if lag > l => LagSwitch::On { lag },
        (true, _, _) if synced || limit.is_none() => LagSwitch::Off { lag },
        _ => LagSwitch::Keep,
    }
}

/// Spacing of consistent flushes. In write-blocking mode a write that arrives during a
/// consistent flush waits for it: under a steady stream of writes, flushing as soon as nothing
/// is dirty would hold writes up most of the time. Consistent points are at least
/// [`CONSISTENT_GAP`] apart instead (the target is current anyway; only its durability waits).
#[derive(Clone, Debug, Default)]
pub struct ConsistentSpacing {
    last: Option<Instant>,
}

impl ConsistentSpacing {
    /// A consistent flush started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// The state asks for a consistent point: may its flush start at `now`? `Err(t)`: at `t`.
    /// Outside write-blocking mode, or when `stopping`, at once.
    pub fn may_start(&self, now: Instant, write_blocking: bool, stopping: bool) -> Result<(), Instant> {
        match self.last {
            Some(t) if write_blocking && !stopping && now.saturating_duration_since(t) < CONSISTENT_GAP => {
                Err(t + CONSISTENT_GAP)
            }
            _ => Ok(()),
        }
    }
}

/// Async mode's flush timing. The queue decides *whether* a flush may make a point (an epoch
/// boundary, everything issued has landed: `ShipQueue::flush_due`); this decides *when*, from
/// the times of the last flushes:
///
/// - **hold**: [`SHIP_POINT_EVERY`] after the last flush, the loop stops issuing so that a
///   flush makes a point within a long epoch (a device that is never flushed);
/// - **idle**: a queue that has shipped everything is flushed [`SHIP_IDLE_GAP`] after the last
///   flush, not at once (under a load the loop keeps up with, the queue empties after nearly
///   every batch);
/// - **with the source**: a flush made for shipping goes to the target alone, except at least
///   one every [`SHIP_CLEAR_EVERY`] and the one when stopping, which take the source's
///   fdatasync too (a pair flush: only those clear bits). Other flushes are always pair flushes.
#[derive(Clone, Debug)]
pub struct ShipSpacing {
    last_flush: Instant,
    last_pair: Instant,
}

impl ShipSpacing {
    /// Counted from `now` (as if both kinds of flush had just completed).
    pub fn new(now: Instant) -> Self {
        ShipSpacing { last_flush: now, last_pair: now }
    }

    /// Whether to stop issuing shipped writes, so that a flush makes a point.
    pub fn hold(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_flush) >= SHIP_POINT_EVERY
    }

    /// When a queue that has shipped everything may be flushed.
    pub fn idle_flush_at(&self) -> Instant {
        self.last_flush + SHIP_IDLE_GAP
    }

    /// Whether a queue that has shipped everything may be flushed at `now`.
    pub fn idle_flush(&self, now: Instant) -> bool {
        now >= self.idle_flush_at()
    }

    /// Whether a flush starting at `now` takes the source's fdatasync: `ship`, it is made for
    /// shipping; `stopping`, the loop is stopping.
    pub fn with_source(&self, now: Instant, ship: bool, stopping: bool) -> bool {
        !ship || stopping || now.saturating_duration_since(self.last_pair) >= SHIP_CLEAR_EVERY
    }

    /// A flush completed successfully at `now`; `pair`: it took the source's fdatasync.
    pub fn flushed(&mut self, now: Instant, pair: bool) {
        self.last_flush = now;
        if pair {
            self.last_pair = now;
        }
    }
}

/// When a checkpoint (a target flush in the middle of a sync, so that an interruption does not
/// recopy finished work) is due: `interval` after the last target flush started, or once
/// `bytes` were copied since.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    since_bytes: u64,
    last: Instant,
}

impl Checkpoints {
    /// Counted from `now`.
    pub fn new(now: Instant) -> Self {
        Checkpoints { since_bytes: 0, last: now }
    }

    /// `n` bytes of data were copied.
    pub fn copied(&mut self, n: u64) {
        self.since_bytes += n;
    }

    /// A target flush (of either kind) started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.since_bytes = 0;
        self.last = now;
    }

    pub fn due(&self, now: Instant, interval: Duration, bytes: u64) -> bool {
        now.saturating_duration_since(self.last) >= interval || self.since_bytes >= bytes
    }
}

/// Why a running --on-consistent command is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKill {
    /// It ran longer than its timeout.
    Timeout,
    /// A stop has waited [`HOOK_STOP_GRACE`] for it.
    StopGrace,
}

/// When the --on-consistent command runs: at a consistent point, at most once per interval
/// (a failed spawn counts as a run); killed after its timeout, or [`HOOK_STOP_GRACE`] after a
/// stop began to wait for it.
#[derive(Clone, Debug, Default)]
pub struct HookSchedule {
    last: Option<Instant>,
    /// Since when a stop waits for the running command.
    stop_seen: Option<Instant>,
}

impl HookSchedule {
    /// Has `interval` passed at `now` since the last run started?
    pub fn may_start(&self, now: Instant, interval: Duration) -> bool {
        self.last.is_none_or(|t| now.saturating_duration_since(t) >= interval)
    }

    /// A run started (or failed to) at `now`.
    pub fn started(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// Each pass of the loop: the command that started at `running` (`None`: none runs), the
    /// loop `stopping` or not. A stop that is called off, or that finds no command, starts no
    /// grace: the next stop's grace counts from its own start.
    pub fn check(&mut self, now: Instant, running: Option<Instant>, stopping: bool, timeout: Duration) -> Option<HookKill> {
        if !stopping || running.is_none() {
            self.stop_seen = None;
        }
        let started = running?;
        if stopping {
            self.stop_seen.get_or_insert(now);
        }
        if now.saturating_duration_since(started) > timeout {
            Some(HookKill::Timeout)
        } else if self.stop_seen.is_some_and(|t| now.saturating_duration_since(t) > HOOK_STOP_GRACE) {
            Some(HookKill::StopGrace)
        } else {
            None
        }
    }
}

/// The copy rate that status reports: the rate over the last sample interval (at least a
/// second, or a quarter of one when asked for), smoothed with the previous estimate.
#[derive(Clone, Debug)]
pub struct RateMeter {
    /// The last sample: its time and the bytes done then.
    at: Instant,
    bytes: u64,
    rate: f64,
}

impl RateMeter {
    pub fn new(now: Instant) -> Self {
        RateMeter { at: now, bytes: 0, rate: 0.0 }
    }

    /// `total` bytes are done at `now` (a count that only grows). Samples at most once a
    /// second, or every quarter second when `force`d (a status request).
    pub fn sample(&mut self, now: Instant, total: u64, force: bool) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        if dt >= 1.0 || (force && dt >= 0.25) {
            let now_rate = total.saturating_sub(self.bytes) as f64 / dt;
            self.rate = if self.rate == 0.0 { now_rate } else { 0.5 * self.rate + 0.5 * now_rate };
            self.at = now;
            self.bytes = total;
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three rules of ShipSpacing, each at its edge.
    #[test]
    fn ship_spacing_edges() {
        let t0 = Instant::now();
        let mut s = ShipSpacing::new(t0);
        assert!(!s.hold(t0 + ms(249)) && s.hold(t0 + SHIP_POINT_EVERY));
        assert!(!s.idle_flush(t0 + ms(99)) && s.idle_flush(t0 + SHIP_IDLE_GAP));
        assert_eq!(s.idle_flush_at(), t0 + SHIP_IDLE_GAP);
        assert!(!s.with_source(t0 + ms(999), true, false));
        assert!(s.with_source(t0 + SHIP_CLEAR_EVERY, true, false));
        assert!(s.with_source(t0 + ms(1), true, true), "the flush when stopping clears");
        assert!(s.with_source(t0 + ms(1), false, false), "a flush not made for shipping is a pair flush");
        // A target-only flush restarts the point timers, not the clearing one.
        s.flushed(t0 + ms(600), false);
        assert!(!s.hold(t0 + ms(800)) && s.hold(t0 + ms(850)));
        assert!(s.with_source(t0 + ms(1000), true, false));
        s.flushed(t0 + ms(1000), true);
        assert!(!s.with_source(t0 + ms(1999), true, false));
    }

    /// A sustained load in one long epoch, on a target whose flush takes `flush` (simulated
    /// time, 1 ms steps): the loop holds and flushes as ShipSpacing says. Points come at least
    /// every SHIP_POINT_EVERY plus a flush, pair flushes at least every SHIP_CLEAR_EVERY plus
    /// a point's time, and no more than one pair flush in three while points are frequent.
    #[test]
    fn ship_spacing_under_a_sustained_load() {
        for flush in [ms(1), ms(5), ms(40)] {
            let t0 = Instant::now();
            let mut s = ShipSpacing::new(t0);
            let (mut points, mut pairs) = (Vec::new(), Vec::new());
            let mut in_flight: Option<(Instant, bool)> = None;
            let mut now = t0;
            while now < t0 + Duration::from_secs(10) {
                match in_flight {
                    Some((done, pair)) if now >= done => {
                        s.flushed(now, pair);
                        points.push(now);
                        if pair {
                            pairs.push(now);
                        }
                        in_flight = None;
                    }
                    None if s.hold(now) => in_flight = Some((now + flush, s.with_source(now, true, false))),
                    _ => {}
                }
                now += ms(1);
            }
            let gaps = |v: &[Instant]| v.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
            assert!(gaps(&points) <= SHIP_POINT_EVERY + flush + ms(1), "{flush:?}: points {:?} apart", gaps(&points));
            assert!(
                gaps(&pairs) <= SHIP_CLEAR_EVERY + SHIP_POINT_EVERY + flush + ms(1),
                "{flush:?}: pair flushes {:?} apart",
                gaps(&pairs)
            );
            assert!(pairs.len() * 3 <= points.len() + 3, "{flush:?}: {} pair flushes for {} points", pairs.len(), points.len());
            assert!(points.len() >= 30, "{flush:?}: only {} points in 10 s", points.len());
        }
    }

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The wait doubles from 100 ms up to 5 s and stays there; a success starts it anew.
    #[test]
    fn backoff_doubles_up_to_its_cap_and_restarts_after_a_success() {
        let t0 = Instant::now();
        let mut b = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let waits: Vec<u64> = (0..9).map(|_| b.failed(t0).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.succeeded();
        assert_eq!(b.failed(t0), ms(100));
        assert_eq!(b.failed(t0), ms(200));
        let mut fixed = Backoff::new(BITMAP_RETRY, BITMAP_RETRY);
        assert_eq!(fixed.failed(t0), BITMAP_RETRY);
        assert_eq!(fixed.failed(t0), BITMAP_RETRY);
    }

    /// A retry is refused until its time, allowed from then on, and its deadline is gone once
    /// allowed; a success leaves a retry already scheduled in place.
    #[test]
    fn a_retry_waits_for_its_time() {
        let t0 = Instant::now();
        let mut b = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        assert!(b.may_retry(t0), "nothing failed yet");
        b.failed(t0);
        b.failed(t0 + ms(50));
        assert_eq!(b.retry_at(), Some(t0 + ms(250)));
        b.succeeded();
        assert_eq!(b.retry_at(), Some(t0 + ms(250)), "a success dropped a scheduled retry");
        assert!(b.waiting(t0 + ms(249)) && !b.may_retry(t0 + ms(249)));
        assert_eq!(b.retry_at(), Some(t0 + ms(250)), "a refused retry consumed its deadline");
        assert!(!b.waiting(t0 + ms(250)) && b.may_retry(t0 + ms(250)));
        assert_eq!(b.retry_at(), None);
        b.failed(t0 + ms(300));
        b.cancel();
        assert!(b.may_retry(t0 + ms(300)));
    }

    /// A target that fails at every retry, each made when due: mirroring gives up at exactly
    /// the failure after `max_retries` retries, the retries spaced by the doubling wait; with 0
    /// it never gives up.
    #[test]
    fn gives_up_exactly_after_max_retries() {
        let t0 = Instant::now();
        for max in [1u32, 2, 3, 10] {
            let mut b = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
            let (mut now, mut failures) = (t0, 0u32);
            loop {
                assert!(b.may_retry(now));
                failures += 1;
                let wait = b.failed(now);
                if gives_up(max, failures) {
                    break;
                }
                assert!(!b.may_retry(now + wait - ms(1)), "retried early after failure {failures}");
                now += wait;
            }
            assert_eq!(failures, max + 1, "max_retries {max}");
            // The time from the first failure to the last: the waits before each retry.
            let spent: Duration = (0..max).map(|i| (MIN_BACKOFF * 2u32.pow(i)).min(MAX_BACKOFF)).sum();
            assert_eq!(now - t0, spent, "max_retries {max}");
        }
        assert!((1..=100_000).all(|f| !gives_up(0, f)), "gave up with max_retries 0");
    }

    /// Copies of one buffer each, started whenever the bucket admits one, for a simulated 10 s:
    /// the bytes started equal the limit's within one burst, and no copy starts while the
    /// bucket refuses.
    #[test]
    fn token_bucket_holds_the_rate_within_one_burst() {
        for (rate, buf) in [(4 * MIB, MIB), (MIB, MIB), (100 * MIB, MIB), (3 * MIB + 12345, 256 << 10)] {
            let t0 = Instant::now();
            let end = t0 + Duration::from_secs(10);
            let mut bucket = TokenBucket::new(t0);
            let (mut now, mut started) = (t0, 0u64);
            while now < end {
                // One pass of the loop: refill, then start copies until refused.
                bucket.refill(now, rate, buf);
                loop {
                    match bucket.admit(now) {
                        Ok(()) => {
                            bucket.spend(buf);
                            started += buf;
                        }
                        Err(at) => {
                            assert!(at > now, "refused until now");
                            now = at;
                            break;
                        }
                    }
                }
            }
            let expected = rate as f64 * 10.0;
            let burst = TokenBucket::burst(rate, buf);
            assert!(
                (started as f64 - expected).abs() <= burst,
                "rate {rate}, buffer {buf}: {started} bytes in 10 s, expected {expected} within {burst}"
            );
        }
    }

    /// An idle bucket fills up to one burst only: after a minute without copies, what starts
    /// at once is one burst (a whole number of copies here, so no overdraft).
    #[test]
    fn an_idle_bucket_holds_one_burst() {
        let t0 = Instant::now();
        let (rate, buf) = (40 * MIB, MIB);
        let mut bucket = TokenBucket::new(t0);
        let now = t0 + Duration::from_secs(60);
        bucket.refill(now, rate, buf);
        let mut started = 0;
        while bucket.admit(now).is_ok() {
            bucket.spend(buf);
            started += buf;
        }
        assert_eq!(started, 10 * MIB, "a quarter second of 40 MiB/s");
        // The overdraft is paid back before the next copy: the bucket is at 0 now.
        assert_eq!(bucket.admit(now), Err(now + ms(1)));
    }

    /// Without a limit copies always start and the bucket is left as it was: a limit set
    /// later does not pay for what was copied without one.
    #[test]
    fn no_limit_leaves_the_bucket_alone() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(t0);
        bucket.refill(t0, MIB, MIB);
        bucket.spend(MIB);
        bucket.refill(t0 + ms(500), 0, MIB);
        for _ in 0..1000 {
            assert_eq!(bucket.admit(t0 + ms(500)), Ok(()));
            bucket.spend(MIB);
        }
        // Under 1 MiB/s again: 1 MiB was overdrawn at t0, and is earned back 1 s later.
        bucket.refill(t0 + ms(999), MIB, MIB);
        assert!(bucket.admit(t0 + ms(999)).is_err());
        bucket.refill(t0 + ms(1001), MIB, MIB);
        assert!(bucket.admit(t0 + ms(1001)).is_ok(), "the bucket paid for unlimited copies");
    }

    /// The first window after writes begin turns busy on; the first quiet window turns it off;
    /// a partial window keeps the last verdict; the threshold is 32 requests a window.
    #[test]
    fn busy_turns_on_after_writes_and_off_after_a_quiet_window() {
        let t0 = Instant::now();
        let mut d = BusyDetector::new(t0, 0);
        let mut requests = 0u64;
        let mut now = t0;
        // 40 requests a window, checked every 10 ms.
        let mut verdicts = Vec::new();
        for tick in 1..=100u64 {
            now = t0 + ms(10 * tick);
            requests += if tick <= 50 { 4 } else { 0 };
            verdicts.push(d.observe(now, requests));
        }
        // Busy from the end of the first window (250 ms) to the end of the first window without
        // requests: the one from 500 to 750 ms.
        let first_busy = verdicts.iter().position(|&b| b).map(|i| (i as u64 + 1) * 10);
        let last_busy = verdicts.iter().rposition(|&b| b).map(|i| (i as u64 + 1) * 10);
        assert_eq!((first_busy, last_busy), (Some(250), Some(740)));
        assert!(!d.observe(now, requests));
        // The threshold: 31 requests in a window are not busy, 32 are.
        for (n, busy) in [(31, false), (32, true)] {
            let mut d = BusyDetector::new(t0, 0);
            assert_eq!(d.observe(t0 + BUSY_WINDOW, n), busy, "{n} requests");
        }
    }

    /// A detector made after many requests (a loop restarted by its supervisor, or after a
    /// reverse switchover) counts only the requests from its start: 10,000 before it and
    /// none since are not a busy first window.
    #[test]
    fn a_late_detector_counts_from_its_start() {
        let t0 = Instant::now();
        let mut d = BusyDetector::new(t0, 10_000);
        assert!(!d.observe(t0 + BUSY_WINDOW, 10_000));
        assert!(d.observe(t0 + BUSY_WINDOW * 2, 10_000 + BUSY_REQUESTS));
    }

    /// A window the loop slept through is judged by its rate: 40 requests over 2 s are a
    /// trickle, not a busy window.
    #[test]
    fn a_long_window_is_judged_by_its_rate() {
        let t0 = Instant::now();
        let mut d = BusyDetector::new(t0, 0);
        assert!(!d.observe(t0 + Duration::from_secs(2), 40));
        assert!(d.observe(t0 + Duration::from_secs(4), 40 + 2 * 128 * 2));
    }

    #[test]
    fn the_copy_yields_only_to_a_lower_busy_speed() {
        let lim = |rate, yielding| CopyLimit { rate, yielding };
        // (speed, busy_speed, busy, must_catch_up)
        assert_eq!(copy_limit(0, MIB, true, false), lim(MIB, true));
        assert_eq!(copy_limit(8 * MIB, MIB, true, false), lim(MIB, true));
        assert_eq!(copy_limit(8 * MIB, MIB, false, false), lim(8 * MIB, false));
        assert_eq!(copy_limit(MIB, 8 * MIB, true, false), lim(MIB, false));
        assert_eq!(copy_limit(MIB, MIB, true, false), lim(MIB, false));
        assert_eq!(copy_limit(0, 0, true, false), lim(0, false));
        assert_eq!(copy_limit(8 * MIB, MIB, true, true), lim(8 * MIB, false));
    }

    /// Write-blocking goes on once the lag exceeds the limit (not at it), stays on while the
    /// target is behind, and goes off once synced or once the limit is removed.
    #[test]
    fn max_lag_switches_on_past_the_limit_and_off_once_synced() {
        let t0 = Instant::now();
        let limit = Some(ms(500));
        let behind = Some(t0);
        assert_eq!(max_lag(t0 + ms(500), limit, false, false, behind), LagSwitch::Keep);
        assert_eq!(max_lag(t0 + ms(501), limit, false, false, behind), LagSwitch::On { lag: ms(501) });
        assert_eq!(max_lag(t0 + Duration::from_secs(60), limit, true, false, behind), LagSwitch::Keep);
        assert_eq!(max_lag(t0 + Duration::from_secs(60), limit, true, true, behind), LagSwitch::Off { lag: None });
        assert_eq!(max_lag(t0 + ms(700), None, true, false, behind), LagSwitch::Off { lag: Some(ms(700)) });
        // No limit, or synced: never on.
        assert_eq!(max_lag(t0 + Duration::from_secs(3600), None, false, false, behind), LagSwitch::Keep);
        assert_eq!(max_lag(t0 + Duration::from_secs(3600), limit, false, true, behind), LagSwitch::Keep);
        assert_eq!(max_lag(t0 + Duration::from_secs(3600), limit, false, false, None), LagSwitch::Keep);
    }

    /// Consistent points asked for every millisecond for a simulated 10 s: in write-blocking
    /// mode one every 500 ms, each when the previous one's gap ends; otherwise every time; a
    /// stop never waits.
    #[test]
    fn consistent_points_are_spaced_in_write_blocking_mode() {
        let t0 = Instant::now();
        for write_blocking in [true, false] {
            let mut s = ConsistentSpacing::default();
            let mut starts = Vec::new();
            for i in 0..10_000 {
                let now = t0 + ms(i);
                match s.may_start(now, write_blocking, false) {
                    Ok(()) => {
                        s.started(now);
                        starts.push(i);
                    }
                    Err(at) => assert_eq!(Some(at), s.last.map(|t| t + CONSISTENT_GAP)),
                }
            }
            if write_blocking {
                assert_eq!(starts, (0..20).map(|k| k * 500).collect::<Vec<_>>());
            } else {
                assert_eq!(starts.len(), 10_000);
            }
        }
        let mut s = ConsistentSpacing::default();
        s.started(t0);
        assert_eq!(s.may_start(t0 + ms(1), true, true), Ok(()));
        assert_eq!(s.may_start(t0 + ms(1), true, false), Err(t0 + CONSISTENT_GAP));
    }

    /// A checkpoint is due `interval` after the last target flush, or after `bytes` copied,
    /// whichever comes first; a flush of either kind starts both counts anew.
    #[test]
    fn checkpoints_come_by_time_or_by_bytes() {
        let t0 = Instant::now();
        let (interval, bytes) = (Duration::from_secs(5), 64 * MIB);
        // Fast: 1 MiB every 10 ms, due by bytes after 64 copies.
        let mut c = Checkpoints::new(t0);
        let mut due_at = Vec::new();
        for i in 1..=200u64 {
            c.copied(MIB);
            let now = t0 + ms(10 * i);
            if c.due(now, interval, bytes) {
                due_at.push(i * 10);
                c.started(now);
            }
        }
        assert_eq!(due_at, [640, 1280, 1920]);
        // Slow: 1 MiB a second, due by time.
        let mut c = Checkpoints::new(t0);
        let mut due_at = Vec::new();
        for s in 1..=12u64 {
            c.copied(MIB);
            let now = t0 + Duration::from_secs(s);
            if c.due(now, interval, bytes) {
                due_at.push(s);
                c.started(now);
            }
        }
        assert_eq!(due_at, [5, 10]);
    }

    /// Consistent points every second for a simulated 10 minutes: with an interval of 60 s the
    /// command runs at the first point and then once each 60 s; with 0 at every point.
    #[test]
    fn the_hook_runs_at_most_once_per_interval() {
        let t0 = Instant::now();
        for (interval, runs) in [(Duration::from_secs(60), 10), (Duration::ZERO, 600), (Duration::from_millis(2500), 200)] {
            let mut h = HookSchedule::default();
            let mut n = 0;
            for s in 0..600 {
                let now = t0 + Duration::from_secs(s);
                if h.may_start(now, interval) {
                    h.started(now);
                    n += 1;
                }
            }
            assert_eq!(n, runs, "interval {interval:?}");
        }
    }

    /// A running command is killed after its timeout, or HOOK_STOP_GRACE after a stop began to
    /// wait; a stop that was called off starts no grace.
    #[test]
    fn the_hook_is_killed_after_its_timeout_or_the_stop_grace() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(20);
        let mut h = HookSchedule::default();
        assert_eq!(h.check(t0, None, true, timeout), None);
        assert_eq!(h.check(t0 + timeout, Some(t0), false, timeout), None);
        assert_eq!(h.check(t0 + timeout + ms(1), Some(t0), false, timeout), Some(HookKill::Timeout));
        // A stop from 5 s, called off at 9 s, again from 12 s: killed just after 22 s.
        let mut h = HookSchedule::default();
        let timeout = Duration::from_secs(100);
        let mut killed = None;
        for i in 0..300u64 {
            let now = t0 + ms(100 * i);
            let stopping = (50..90).contains(&i) || i >= 120;
            if let Some(k) = h.check(now, Some(t0), stopping, timeout) {
                killed = Some((i, k));
                break;
            }
        }
        assert_eq!(killed, Some((221, HookKill::StopGrace)));
    }

    /// A steady 10 MiB/s sampled every 100 ms: the estimate is exact from the first second on
    /// and moves only once a second (or every quarter second when forced); each sample of an
    /// interval without copies halves it.
    #[test]
    fn the_rate_estimate_follows_the_copy() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(t0);
        let rate = (10 * MIB) as f64;
        for i in 1..=30u64 {
            m.sample(t0 + ms(100 * i), MIB * i, false);
            let want = if i < 10 { 0.0 } else { rate };
            assert_eq!(m.rate(), want, "after {} ms", 100 * i);
        }
        let total = 30 * MIB;
        m.sample(t0 + ms(3200), total, true);
        assert_eq!(m.rate(), rate, "a forced sample before a quarter second");
        m.sample(t0 + ms(3250), total, true);
        assert_eq!(m.rate(), rate / 2.0, "a forced sample after a quarter second of nothing");
        m.sample(t0 + ms(3300), total, false);
        assert_eq!(m.rate(), rate / 2.0, "an unforced sample before a second");
        m.sample(t0 + ms(4250), total, false);
        assert_eq!(m.rate(), rate / 4.0);
    }
}
