//! Whether a VM may skip a request's per-request work because nothing it, or any other worker,
//! has seen lately calls for it.
//!
//! While calm, a request costs what retrying it needs: the method and the retry headers. It
//! does not read its route's cluster, a shared table or anything of its answer, and it is
//! decided as a request to a cluster with nothing known against it is. One request in
//! `SAMPLE_EVERY`, and the first once the clock has moved on `SAMPLE_MS`, still takes the full
//! path, so budgets and tables go on learning. A retry or failure seen there or an answer cut
//! short ends the calm at once; so does a shared alarm that any worker raises when it meets
//! trouble, and any shared table that would change a decision (a stall sweep that doubts an
//! endpoint or finds one silent makes one; a sweep alone does not). Calm returns once nothing
//! has gone wrong for `CALM_AFTER_MS`.

/// How long after the last trouble a VM stays on the full path.
pub const CALM_AFTER_MS: u64 = 10_000;
/// While calm, one request in this many takes the full path.
pub const SAMPLE_EVERY: u64 = 64;
/// While calm, the first request once the clock has moved on this much takes the full path:
/// at low rates, where one in `SAMPLE_EVERY` would be seldom, about every request is one.
pub const SAMPLE_MS: u64 = 50;
/// A VM that keeps meeting trouble raises the alarm again at most this often.
const RAISE_EVERY_MS: u64 = 1_000;

/// Which way one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Method and retry headers only.
    Calm,
    /// Everything; `weight` is how many requests this one stands for in the budget (itself,
    /// and the calm ones since the last full one).
    Full { weight: u64 },
}

#[derive(Debug, Default)]
pub struct Calm {
    calm: bool,
    /// When this VM last met trouble or learnt of some through the alarm.
    last_trouble_ms: Option<u64>,
    /// The shared alarm's value when last read.
    alarm: Option<u64>,
    last_raised_ms: Option<u64>,
    /// Calm requests since the last full one.
    since_sample: u64,
    sampled_ms: u64,
}

impl Calm {
    pub fn is_calm(&self) -> bool {
        self.calm
    }

    /// The path of the next request; `clock_ms` is the clock as last read, not read for this.
    pub fn path(&mut self, clock_ms: u64) -> Path {
        if !self.calm {
            return Path::Full { weight: 1 };
        }
        if self.since_sample + 1 >= SAMPLE_EVERY || clock_ms >= self.sampled_ms.saturating_add(SAMPLE_MS) {
            let weight = self.since_sample + 1;
            self.since_sample = 0;
            self.sampled_ms = clock_ms;
            return Path::Full { weight };
        }
        self.since_sample += 1;
        Path::Calm
    }

    /// This VM met trouble: calm ends. True when the others should be told (the alarm raised).
    pub fn trouble(&mut self, now_ms: u64) -> bool {
        self.calm = false;
        self.last_trouble_ms = Some(self.last_trouble_ms.map_or(now_ms, |at| at.max(now_ms)));
        let raise = self.last_raised_ms.is_none_or(|at| now_ms.saturating_sub(at) >= RAISE_EVERY_MS);
        if raise {
            self.last_raised_ms = Some(now_ms);
        }
        raise
    }

    /// The shared alarm as read now: if it changed since the last read, some worker (maybe
    /// this one) met trouble, and calm ends here too.
    pub fn alarm_read(&mut self, value: u64, now_ms: u64) {
        if self.alarm.replace(value).is_some_and(|before| before != value) {
            self.calm = false;
            self.last_trouble_ms = Some(now_ms);
        }
    }

    /// Once in a while: `healthy` says whether every cluster's shared table would leave
    /// requests undecided (nothing to steer, no fallback) and no sweep is finding silent
    /// endpoints. Calm returns once that holds and no trouble came for `CALM_AFTER_MS`; it
    /// ends if a table needs decisions again.
    pub fn settle(&mut self, now_ms: u64, healthy: bool) {
        let quiet_long = self.last_trouble_ms.is_none_or(|at| now_ms.saturating_sub(at) >= CALM_AFTER_MS);
        let calm = healthy && quiet_long;
        if calm && !self.calm {
            self.since_sample = 0;
            self.sampled_ms = now_ms;
        }
        self.calm = calm;
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn calm_at(now_ms: u64) -> Calm {
        let mut c = Calm::default();
        c.settle(now_ms, true);
        c
    }

    #[test]
    fn a_new_vm_is_on_the_full_path_until_it_has_looked() {
        let mut c = Calm::default();
        assert_eq!(c.path(0), Path::Full { weight: 1 });
        c.settle(0, false);
        assert!(!c.is_calm(), "a table needing decisions keeps it on the full path");
        c.settle(0, true);
        assert!(c.is_calm(), "nothing went wrong yet, and nothing known needs decisions");
    }

    #[test]
    fn while_calm_one_request_in_a_sample_takes_the_full_path_and_stands_for_the_rest() {
        let mut c = calm_at(1_000);
        let paths: Vec<Path> = (0..(2 * SAMPLE_EVERY)).map(|_| c.path(1_000)).collect();
        let full: Vec<u64> = paths
            .iter()
            .filter_map(|p| match p {
                Path::Full { weight } => Some(*weight),
                Path::Calm => None,
            })
            .collect();
        assert_eq!(full, vec![SAMPLE_EVERY, SAMPLE_EVERY], "weights add up to every request");
        // The clock moving on (a tick) makes the next request a full one.
        assert_eq!(c.path(1_000 + SAMPLE_MS), Path::Full { weight: 1 });
        assert_eq!(c.path(1_000 + SAMPLE_MS), Path::Calm);
    }

    #[test]
    fn trouble_ends_calm_at_once_and_it_returns_only_after_a_quiet_while() {
        let mut c = calm_at(0);
        assert!(c.trouble(5_000), "the first trouble raises the alarm");
        assert!(!c.is_calm());
        assert_eq!(c.path(5_000), Path::Full { weight: 1 });
        assert!(!c.trouble(5_500), "raised again at most once a second");
        assert!(c.trouble(6_500));
        c.settle(6_500 + CALM_AFTER_MS - 1, true);
        assert!(!c.is_calm());
        c.settle(6_500 + CALM_AFTER_MS, true);
        assert!(c.is_calm());
    }

    #[test]
    fn another_workers_alarm_ends_calm_and_a_troubled_table_keeps_it_away() {
        let mut c = calm_at(0);
        c.alarm_read(7, 100);
        assert!(c.is_calm(), "the first read only learns the value");
        c.alarm_read(7, 150);
        assert!(c.is_calm());
        c.alarm_read(8, 200);
        assert!(!c.is_calm(), "someone met trouble");
        c.settle(200 + CALM_AFTER_MS, false);
        assert!(!c.is_calm(), "a table that needs decisions");
        c.settle(200 + CALM_AFTER_MS, true);
        assert!(c.is_calm());
        c.settle(200 + CALM_AFTER_MS + 1_000, false);
        assert!(!c.is_calm(), "a table turned troubled without an alarm (a probe, another VM)");
    }
}
