//! Lock-free outcome windows. Concurrent writers may make a count briefly
//! lag by the number of in-flight writers; a breaker decision tolerates
//! that, and none of these structures can be left permanently wrong: every
//! slot's contribution is added when it is swapped in and removed when it
//! is swapped out.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering::*};

/// fuse's count window: the timestamps of the last `max_r + 1` failures in
/// a ring. The breaker blows when the oldest of them is inside `max_t`.
pub(crate) struct FuseWindow {
    slots: Box<[AtomicU64]>,
    next: AtomicUsize,
    max_t: u64,
}

impl FuseWindow {
    pub(crate) fn new(max_r: u32, max_t_nanos: u64) -> Self {
        let n = max_r as usize + 1;
        Self {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            max_t: max_t_nanos,
        }
    }

    /// Records a failure at `now`; true when this is the `(max_r+1)`-th
    /// failure inside `max_t`.
    pub(crate) fn melt(&self, now: u64) -> bool {
        let n = self.slots.len();
        let i = self.next.fetch_add(1, Relaxed) % n;
        // Stored as now+1 so that 0 keeps meaning "empty".
        self.slots[i].store(now + 1, Release);
        let oldest = self.slots[(i + 1) % n].load(Acquire);
        oldest != 0 && now + 1 - oldest.min(now + 1) <= self.max_t
    }

    pub(crate) fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Release);
        }
    }
}

/// Outcome flags stored per slot of a count-based rate window.
const RECORDED: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

/// Totals read from a rate window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
}

pub(crate) enum RateWindow {
    Count {
        slots: Box<[AtomicU8]>,
        next: AtomicUsize,
        calls: AtomicI64,
        failures: AtomicI64,
        slow: AtomicI64,
    },
    Time {
        buckets: Box<[Bucket]>,
        bucket_nanos: u64,
    },
}

pub(crate) struct Bucket {
    epoch: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

const NO_EPOCH: u64 = u64::MAX;

fn flags(failed: bool, slow: bool) -> u8 {
    RECORDED | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 }
}

fn bit(v: u8, b: u8) -> i64 {
    i64::from(v & b != 0)
}

impl RateWindow {
    pub(crate) fn count(n: u32) -> Self {
        Self::Count {
            slots: (0..n).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicUsize::new(0),
            calls: AtomicI64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    pub(crate) fn time(n: u32, bucket_nanos: u64) -> Self {
        Self::Time {
            buckets: (0..n)
                .map(|_| Bucket {
                    epoch: AtomicU64::new(NO_EPOCH),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                })
                .collect(),
            bucket_nanos: bucket_nanos.max(1),
        }
    }

    /// Whether `record` and `totals` look at the time.
    pub(crate) fn needs_time(&self) -> bool {
        matches!(self, Self::Time { .. })
    }

    /// Records one outcome and returns the window's totals after it.
    pub(crate) fn record(&self, now: u64, failed: bool, slow: bool) -> Totals {
        match self {
            Self::Count {
                slots,
                next,
                calls,
                failures,
                slow: slows,
            } => {
                let i = next.fetch_add(1, Relaxed) % slots.len();
                let new = flags(failed, slow);
                let old = slots[i].swap(new, AcqRel);
                Self::apply(calls, failures, slows, old, new);
                self.totals(now)
            }
            Self::Time {
                buckets,
                bucket_nanos,
            } => {
                let epoch = now / bucket_nanos;
                let b = &buckets[(epoch % buckets.len() as u64) as usize];
                let seen = b.epoch.load(Acquire);
                if seen != epoch
                    && b.epoch
                        .compare_exchange(seen, epoch, AcqRel, Acquire)
                        .is_ok()
                {
                    // We own the reset of this bucket for its new epoch.
                    b.calls.store(0, Release);
                    b.failures.store(0, Release);
                    b.slow.store(0, Release);
                }
                b.calls.fetch_add(1, AcqRel);
                if failed {
                    b.failures.fetch_add(1, AcqRel);
                }
                if slow {
                    b.slow.fetch_add(1, AcqRel);
                }
                self.totals(now)
            }
        }
    }

    fn apply(calls: &AtomicI64, failures: &AtomicI64, slows: &AtomicI64, old: u8, new: u8) {
        let d = bit(new, RECORDED) - bit(old, RECORDED);
        if d != 0 {
            calls.fetch_add(d, AcqRel);
        }
        let d = bit(new, FAILED) - bit(old, FAILED);
        if d != 0 {
            failures.fetch_add(d, AcqRel);
        }
        let d = bit(new, SLOW) - bit(old, SLOW);
        if d != 0 {
            slows.fetch_add(d, AcqRel);
        }
    }

    /// Current totals (O(1) for count windows, O(buckets) for time windows).
    pub(crate) fn totals(&self, now: u64) -> Totals {
        match self {
            Self::Count {
                calls,
                failures,
                slow,
                ..
            } => Totals {
                calls: calls.load(Acquire).max(0) as u64,
                failures: failures.load(Acquire).max(0) as u64,
                slow: slow.load(Acquire).max(0) as u64,
            },
            Self::Time {
                buckets,
                bucket_nanos,
            } => {
                let epoch = now / bucket_nanos;
                let n = buckets.len() as u64;
                let mut t = Totals::default();
                for b in buckets.iter() {
                    let e = b.epoch.load(Acquire);
                    if e != NO_EPOCH && e <= epoch && epoch - e < n {
                        t.calls += b.calls.load(Acquire);
                        t.failures += b.failures.load(Acquire);
                        t.slow += b.slow.load(Acquire);
                    }
                }
                t
            }
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Self::Count {
                slots,
                calls,
                failures,
                slow,
                ..
            } => {
                for s in slots.iter() {
                    let old = s.swap(0, AcqRel);
                    Self::apply(calls, failures, slow, old, 0);
                }
            }
            Self::Time { buckets, .. } => {
                for b in buckets.iter() {
                    b.epoch.store(NO_EPOCH, Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_blows_on_the_max_r_plus_one_th_failure_inside_max_t() {
        let w = FuseWindow::new(2, 100);
        assert!(!w.melt(0));
        assert!(!w.melt(10));
        assert!(w.melt(100));
        w.clear();
        assert!(!w.melt(1000));
        assert!(!w.melt(1050));
        // The first melt (1000) is 101 ns old at 1101: outside max_t.
        assert!(!w.melt(1101));
        assert!(w.melt(1150));
    }

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = RateWindow::count(3);
        w.record(0, true, false);
        w.record(0, true, true);
        let t = w.record(0, false, false);
        assert_eq!((t.calls, t.failures, t.slow), (3, 2, 1));
        let t = w.record(0, false, false);
        assert_eq!((t.calls, t.failures, t.slow), (3, 1, 1));
        w.clear();
        assert_eq!(w.totals(0), Totals::default());
    }

    #[test]
    fn time_window_drops_old_buckets() {
        let w = RateWindow::time(3, 10);
        w.record(0, true, false);
        w.record(15, false, false);
        assert_eq!(w.totals(29).calls, 2);
        assert_eq!(w.totals(30).calls, 1);
        let t = w.record(45, true, false);
        // Epoch 4 keeps epochs 2..=4: the outcome at 15 (epoch 1) fell out.
        assert_eq!((t.calls, t.failures), (1, 1));
        w.clear();
        assert_eq!(w.totals(45).calls, 0);
    }
}
