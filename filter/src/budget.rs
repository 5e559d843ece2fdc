//! Retry budget: retries may add at most `ratio` of the offered load, plus a floor per second.
//!
//! Counted over a sliding window of one-second buckets, as in Finagle's and Linkerd's budgets.
//! Retries are granted up front (Envoy performs them) and charged when the request ends and
//! Envoy reports how many attempts it made, so a full outage drains the budget within a few
//! requests and further requests get no retries until successes refill it.

use crate::config::RetryBudgetConfig;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    second: u64,
    requests: u32,
    retries: u32,
}

#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    buckets: Vec<Bucket>,
}

impl RetryBudget {
    pub fn new(config: &RetryBudgetConfig) -> Self {
        let window = usize::try_from(config.window_seconds).unwrap_or(1).max(1);
        Self {
            ratio: config.ratio,
            min_per_second: config.min_retries_per_second,
            buckets: vec![Bucket::default(); window],
        }
    }

    fn bucket(&mut self, now_ms: u64) -> Option<&mut Bucket> {
        let second = now_ms / 1_000;
        let len = self.buckets.len() as u64;
        let slot = usize::try_from(second % len.max(1)).ok()?;
        let b = self.buckets.get_mut(slot)?;
        if b.second != second {
            *b = Bucket { second, requests: 0, retries: 0 };
        }
        Some(b)
    }

    /// Counts `n` original requests.
    pub fn deposit(&mut self, now_ms: u64, n: u64) {
        if let Some(b) = self.bucket(now_ms) {
            b.requests = b.requests.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    /// Charges retries Envoy performed for a finished request.
    pub fn withdraw(&mut self, now_ms: u64, retries: u32) {
        if retries == 0 {
            return;
        }
        if let Some(b) = self.bucket(now_ms) {
            b.retries = b.retries.saturating_add(retries);
        }
    }

    /// Retries still allowed in the current window.
    pub fn available(&self, now_ms: u64) -> u32 {
        let second = now_ms / 1_000;
        let window = self.buckets.len() as u64;
        let (requests, retries) = self
            .buckets
            .iter()
            .filter(|b| b.second + window > second && b.second <= second)
            .fold((0u64, 0u64), |(q, r), b| (q + u64::from(b.requests), r + u64::from(b.retries)));
        let allowed = self.ratio * requests as f64 + f64::from(self.min_per_second) * window as f64;
        let left = allowed - retries as f64;
        if left <= 0.0 {
            0
        } else {
            left.min(f64::from(u32::MAX)) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn budget(ratio: f64, min: u32, window: u32) -> RetryBudget {
        RetryBudget::new(&RetryBudgetConfig { ratio, min_retries_per_second: min, window_seconds: window })
    }

    #[test]
    fn full_outage_drains_the_budget() {
        let mut b = budget(0.2, 1, 10);
        let mut retries = 0;
        for i in 0..1_000u64 {
            let now = i; // a thousand requests within one second
            b.deposit(now, 1);
            let granted = b.available(now).min(3);
            b.withdraw(now, granted); // every retry was used and failed
            retries += granted;
        }
        // 0.2 * 1000 + 1/s * 10 s, give or take the grant granularity.
        assert!((200..=213).contains(&retries), "{retries}");
    }

    #[test]
    fn healthy_traffic_keeps_retries_available() {
        let mut b = budget(1.0, 10, 10);
        for i in 0..100u64 {
            b.deposit(i * 10, 1);
        }
        assert!(b.available(1_000) >= 10);
        assert!(b.available(1_000) >= 200);
    }

    #[test]
    fn one_deposit_may_stand_for_many_requests() {
        let mut b = budget(0.5, 0, 10);
        b.deposit(0, 40);
        b.deposit(0, 0);
        assert_eq!(b.available(0), 20);
    }

    #[test]
    fn minimum_allows_retries_on_idle_routes() {
        let b = budget(0.0, 5, 2);
        assert_eq!(b.available(0), 10);
    }

    #[test]
    fn old_buckets_fall_out_of_the_window() {
        let mut b = budget(0.0, 1, 5);
        b.withdraw(0, 5);
        assert_eq!(b.available(1_000), 0);
        assert_eq!(b.available(5_000), 5, "the retries of second 0 expired");
        b.withdraw(12_345, 2);
        assert_eq!(b.available(12_999), 3);
    }

    #[test]
    fn zero_ratio_zero_floor_means_no_retries() {
        let mut b = budget(0.0, 0, 10);
        b.deposit(0, 1);
        assert_eq!(b.available(0), 0);
    }
}
