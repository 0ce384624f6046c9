//! The descriptors the front end (the device's queues) does its I/O on, replaced under live I/O.
//!
//! A switchover changes the file the device reads and writes, and `switchover --reverse` swaps
//! source and target. Each request takes the current set when it starts and holds it until its
//! last operation has completed; a replacement publishes the new set and then waits until no
//! request holds the old one. Only after that wait may a descriptor of the old set be closed or
//! pointed elsewhere: an operation queued with a raw descriptor number resolves it when the
//! kernel issues it, so a number reused too early would send a request to another file.
//!
//! Two epochs, as in sleepable RCU: holders count themselves in the slot of the epoch they saw
//! and check that it is still current, so a replacement waits only for the requests that began
//! before it, never for the stream of new ones.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One set of descriptors. `target` is -1 when the front end cannot reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fds {
    pub source: RawFd,
    pub target: RawFd,
}

/// A request's hold on a set; give it back with [`FrontFds::exit`].
#[derive(Debug)]
pub struct FdsHold {
    pub fds: Fds,
    parity: usize,
}

pub struct FrontFds {
    epoch: AtomicU64,
    users: [AtomicU64; 2],
    sets: [[AtomicI32; 2]; 2],
}

impl FrontFds {
    pub fn new(fds: Fds) -> Self {
        let f = FrontFds {
            epoch: AtomicU64::new(0),
            users: [AtomicU64::new(0), AtomicU64::new(0)],
            sets: Default::default(),
        };
        f.store(0, fds);
        f
    }

    fn store(&self, parity: usize, fds: Fds) {
        let s = &self.sets[parity];
        s[0].store(fds.source, Ordering::SeqCst);
        s[1].store(fds.target, Ordering::SeqCst);
    }

    fn load(&self, parity: usize) -> Fds {
        let s = &self.sets[parity];
        Fds {
            source: s[0].load(Ordering::SeqCst),
            target: s[1].load(Ordering::SeqCst),
        }
    }

    /// The current set, held until [`Self::exit`].
    pub fn enter(&self) -> FdsHold {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let parity = (e & 1) as usize;
            self.users[parity].fetch_add(1, Ordering::SeqCst);
            // Counted first, then checked: a replacement that bumped the epoch before our count
            // became visible is seen here (we retry on the new epoch); one that bumps it after
            // sees our count and waits for us. Either way we never use a set being replaced
            // without being waited for.
            if self.epoch.load(Ordering::SeqCst) == e {
                return FdsHold { fds: self.load(parity), parity };
            }
            self.users[parity].fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn exit(&self, h: FdsHold) {
        self.users[h.parity].fetch_sub(1, Ordering::SeqCst);
    }

    /// The current set, without holding it (for checks and reports).
    pub fn current(&self) -> Fds {
        self.load((self.epoch.load(Ordering::SeqCst) & 1) as usize)
    }

    /// Makes `fds` current, then waits (at most `limit`) until no request holds the previous
    /// set. Returns false on timeout: the old descriptors may still be in use and must stay
    /// open. Callers serialize replacements.
    pub fn publish(&self, fds: Fds, limit: Duration) -> bool {
        let t0 = Instant::now();
        let e = self.epoch.load(Ordering::SeqCst);
        let old = (e & 1) as usize;
        let new = 1 - old;
        // The slot we are about to overwrite belongs to the epoch before the current one: its
        // holders were waited for by the previous replacement, unless that one timed out.
        if !wait_zero(&self.users[new], t0, limit) {
            return false;
        }
        self.store(new, fds);
        self.epoch.store(e + 1, Ordering::SeqCst);
        wait_zero(&self.users[old], t0, limit)
    }
}

fn wait_zero(n: &AtomicU64, t0: Instant, limit: Duration) -> bool {
    while n.load(Ordering::SeqCst) != 0 {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn fds(n: i32) -> Fds {
        Fds { source: n, target: -1 }
    }

    #[test]
    fn publish_waits_for_holders_of_the_old_set_only() {
        let f = Arc::new(FrontFds::new(fds(3)));
        let old = f.enter();
        assert_eq!(old.fds.source, 3);
        let f2 = f.clone();
        let t = std::thread::spawn(move || f2.publish(fds(4), Duration::from_secs(10)));
        // New requests get the new set while the old holder still runs...
        let t0 = Instant::now();
        loop {
            let h = f.enter();
            let d = h.fds.source;
            f.exit(h);
            if d == 4 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the new set was never published");
        }
        // ...and the publisher is still waiting for the old one.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "publish returned while a holder of the old set was running");
        f.exit(old);
        assert!(t.join().unwrap(), "publish timed out after the holder left");
    }

    #[test]
    fn publish_times_out_when_a_holder_never_leaves() {
        let f = FrontFds::new(fds(3));
        let _stuck = f.enter();
        assert!(!f.publish(fds(4), Duration::from_millis(50)));
        // The new set is current all the same.
        assert_eq!(f.current().source, 4);
    }

    /// Under concurrent requests and replacements, a request never uses a set after the
    /// replacement that retired it has returned (here: a retired descriptor is marked "closed"
    /// once publish returns, and no holder may still see it).
    #[test]
    fn no_request_uses_a_retired_set() {
        let f = Arc::new(FrontFds::new(fds(0)));
        let closed = Arc::new((0..200).map(|_| AtomicBool::new(false)).collect::<Vec<_>>());
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (f, closed, stop, made) = (f.clone(), closed.clone(), stop.clone(), made.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let h = f.enter();
                        for _ in 0..50 {
                            assert!(!closed[h.fds.source as usize].load(Ordering::SeqCst), "used a retired descriptor");
                            std::hint::spin_loop();
                        }
                        f.exit(h);
                        n += 1;
                        made.fetch_add(1, Ordering::SeqCst);
                    }
                    n
                })
            })
            .collect();
        for i in 1..200 {
            // Let requests run on each set before it is replaced.
            let seen = made.load(Ordering::SeqCst);
            let t0 = Instant::now();
            while made.load(Ordering::SeqCst) < seen + 3 {
                assert!(t0.elapsed() < Duration::from_secs(10), "the workers stopped making requests");
                std::thread::yield_now();
            }
            assert!(f.publish(fds(i), Duration::from_secs(10)));
            closed[(i - 1) as usize].store(true, Ordering::SeqCst);
        }
        stop.store(true, Ordering::SeqCst);
        let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(total >= 3 * 199, "the workers made only {total} requests");
    }
}
