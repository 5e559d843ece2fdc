//! Requests in flight on this VM: how many each endpoint has, and which get no answer.
//!
//! Steering chooses endpoints itself, so it must not lose what Envoy's least-request balancer
//! knows: an endpoint with requests piling up is slow or gone. The first endpoint of a steered
//! list is the least loaded of those sampled, by this VM's count.
//!
//! A pod whose address vanished (packets dropped, no reset) fails nothing until a connect or
//! per-try timeout fires, seconds later; every request sent to it meanwhile just waits. The only
//! early sign is time: a request still unanswered long after the cluster's requests usually
//! answer. `InFlight` says which clusters have such a request, so that the plugin can doubt the
//! endpoints they were steered to and probe the others with a short timeout, before Envoy's
//! timeouts would tell.
//!
//! "Long" is relative: at least `stallAfterMs`, and `LATENCY_FACTOR` times the cluster's recent
//! p99, so a service whose answers take seconds is not probed for being slow.

use crate::clusters::ClusterMap;
use std::collections::HashMap;

/// A request unanswered for this many times the cluster's recent p99 counts as stalled.
pub const LATENCY_FACTOR: u64 = 4;
/// Latency is kept over two windows of this length: the p99 follows changes within 20 s.
const WINDOW_MS: u64 = 10_000;
/// Fewer answers than this in the windows: p99 unknown, the floor alone applies.
const MIN_SAMPLES: u32 = 20;
/// Power-of-two buckets of milliseconds: [0, 2), [2, 4), ... up to about 36 minutes.
const BUCKETS: usize = 22;
/// One sweep per cluster within this long, however many requests stall meanwhile.
pub const SWEEP_INTERVAL_MS: u64 = 1_000;
/// While sweeps keep finding endpoints that went silent (pods vanishing one batch after
/// another), the next sweep may come this soon, or two stall thresholds if longer: a batch that
/// vanishes just after a sweep must not wait a second to be found.
pub const SWEEP_INTERVAL_ACTIVE_MS: u64 = 200;
/// How long the shorter interval holds after a sweep last found silence.
pub const SWEEP_ACTIVE_FOR_MS: u64 = 10_000;
/// A request left to Envoy's balancer that needed this many retries shows most of Envoy's
/// endpoint list dead (the chance is the dead share squared): exploring it is then a gamble
/// that an unlucky request loses at every attempt.
pub const STALE_LIST_RETRIES: u64 = 2;
/// How long exploration stays off after that; each such request extends it.
pub const EXPLORATION_PAUSE_MS: u64 = 1_000;
/// Requests tracked at once per VM; beyond, new requests go untracked rather than grow memory.
const MAX_TRACKED: usize = 65_536;
const MAX_CLUSTERS: usize = 1_024;

#[derive(Debug, Clone)]
struct Pending {
    /// `None` for a request begun while calm, until its cluster is read (`route`).
    cluster: Option<String>,
    /// The request's proxy-wasm context, through which its cluster can be read later.
    context_id: u32,
    /// The endpoint the request was steered to first, if it was steered.
    endpoint: Option<String>,
    started_ms: u64,
    answered: bool,
    /// Already reported as stalled.
    reported: bool,
}

#[derive(Debug, Clone, Default)]
struct Latency {
    current: [u32; BUCKETS],
    previous: [u32; BUCKETS],
    window_start_ms: u64,
}

impl Latency {
    fn bucket(ms: u64) -> usize {
        // 0 and 1 share the first bucket; then one per power of two.
        let b = (u64::BITS - ms.leading_zeros()).saturating_sub(1) as usize;
        b.min(BUCKETS - 1)
    }

    fn roll(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if elapsed >= WINDOW_MS {
            self.previous = if elapsed >= 2 * WINDOW_MS { [0; BUCKETS] } else { self.current };
            self.current = [0; BUCKETS];
            self.window_start_ms = now_ms;
        }
    }

    fn record(&mut self, ms: u64, now_ms: u64) {
        self.roll(now_ms);
        if let Some(count) = self.current.get_mut(Self::bucket(ms)) {
            *count = count.saturating_add(1);
        }
    }

    /// Upper bound of the bucket holding the 99th percentile over both windows.
    fn p99_ms(&self) -> Option<u64> {
        let counts = self.current.iter().zip(&self.previous).map(|(a, b)| u64::from(*a) + u64::from(*b));
        let total: u64 = counts.clone().sum();
        if total < u64::from(MIN_SAMPLES) {
            return None;
        }
        // The smallest bucket holding at least 99% of answers at or below it.
        let mut below = 0u64;
        for (i, c) in counts.enumerate() {
            below += c;
            if below * 100 >= total * 99 {
                return Some(1u64 << (i + 1));
            }
        }
        None
    }
}

#[derive(Debug, Clone, Default)]
struct ClusterState {
    latency: Latency,
    last_sweep_ms: Option<u64>,
    /// Until when sweeps may follow each other at `SWEEP_INTERVAL_ACTIVE_MS`.
    silence_found_until_ms: u64,
    /// Until when no request is left to Envoy's balancer to find new endpoints.
    exploration_paused_until_ms: u64,
}

/// A cluster with requests that stalled since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub cluster: String,
    /// Probe the cluster's endpoints, waiting this long for each; `None` when the cluster was
    /// probed within `SWEEP_INTERVAL_MS`.
    pub sweep_timeout_ms: Option<u64>,
    /// Endpoints that newly stalled requests were steered to first: most likely where they wait.
    pub endpoints: Vec<String>,
}

#[derive(Debug)]
pub struct InFlight {
    /// 0: stalls are not looked for.
    after_ms: u64,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Steered requests in flight per endpoint they were steered to first.
    load: HashMap<String, u32>,
    clusters: ClusterMap<ClusterState>,
    /// The latest `silence_found_until_ms` and `exploration_paused_until_ms` of any cluster:
    /// while both are past, as nearly always, the per-request questions need no cluster lookup.
    silence_found_until_ms: u64,
    exploration_paused_until_ms: u64,
}

impl InFlight {
    /// `after_ms`: the floor below which no request counts as stalled; 0 looks for no stalls.
    pub fn new(after_ms: u64) -> Self {
        Self {
            after_ms,
            next_id: 0,
            pending: HashMap::new(),
            load: HashMap::new(),
            clusters: ClusterMap::new(MAX_CLUSTERS),
            silence_found_until_ms: 0,
            exploration_paused_until_ms: 0,
        }
    }

    /// Steered requests in flight to `endpoint` first.
    pub fn load(&self, endpoint: &str) -> u32 {
        self.load.get(endpoint).copied().unwrap_or(0)
    }

    /// A request to `cluster` started, steered first to `endpoint` if any; `None` when too many
    /// are tracked already.
    pub fn begin(&mut self, cluster: &str, endpoint: Option<&str>, now_ms: u64) -> Option<u64> {
        let id = self.track(Pending {
            cluster: Some(cluster.to_string()),
            context_id: 0,
            endpoint: endpoint.map(str::to_string),
            started_ms: now_ms,
            answered: false,
            reported: false,
        })?;
        if let Some(e) = endpoint {
            match self.load.get_mut(e) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    self.load.insert(e.to_string(), 1);
                }
            }
        }
        Some(id)
    }

    /// A request whose cluster is not known (begun while calm), in proxy-wasm context
    /// `context_id`: its cluster is read only if it waits past the floor (`unrouted_waiting`).
    pub fn begin_unrouted(&mut self, context_id: u32, now_ms: u64) -> Option<u64> {
        self.track(Pending {
            cluster: None,
            endpoint: None,
            context_id,
            started_ms: now_ms,
            answered: false,
            reported: false,
        })
    }

    /// Gives `pending` an id; `None` when too many are tracked already.
    fn track(&mut self, pending: Pending) -> Option<u64> {
        if self.pending.len() >= MAX_TRACKED {
            return None;
        }
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.insert(self.next_id, pending);
        Some(self.next_id)
    }

    /// Requests of unknown cluster unanswered past the floor, as (id, context): their clusters
    /// must be read (and given to `route`) before any threshold can say whether they stalled.
    pub fn unrouted_waiting(&self, now_ms: u64) -> Vec<(u64, u32)> {
        if self.after_ms == 0 {
            return Vec::new();
        }
        self.pending
            .iter()
            .filter(|(_, p)| p.cluster.is_none() && !p.answered && now_ms.saturating_sub(p.started_ms) > self.after_ms)
            .map(|(id, p)| (*id, p.context_id))
            .collect()
    }

    /// Request `id`'s cluster, once read: from now on it is watched as any other. A request
    /// whose cluster cannot be read is no longer watched.
    pub fn route(&mut self, id: u64, cluster: Option<&str>) {
        match cluster {
            Some(c) => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.cluster = Some(c.to_string());
                }
            }
            None => {
                self.pending.remove(&id);
            }
        }
    }

    /// The request's response headers arrived (from an endpoint or from Envoy itself).
    pub fn answered(&mut self, id: u64) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.answered = true;
        }
    }

    /// The request ended. One answered at the first attempt tells how long the cluster's
    /// endpoints take to answer; one that needed retries tells how long failures took.
    pub fn end(&mut self, id: u64, now_ms: u64, first_attempt: bool) {
        let Some(p) = self.pending.remove(&id) else { return };
        if let Some(e) = &p.endpoint {
            if let Some(n) = self.load.get_mut(e) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.load.remove(e);
                }
            }
        }
        if let (true, true, Some(cluster)) = (p.answered, first_attempt, &p.cluster) {
            let state = self.clusters.get_or_insert_with(cluster, now_ms, ClusterState::default);
            if let Some(state) = state {
                state.latency.record(now_ms.saturating_sub(p.started_ms), now_ms);
            }
        }
    }

    /// How long a request to `cluster` may wait for an answer before it counts as stalled.
    pub fn threshold_ms(&self, cluster: &str) -> u64 {
        let p99 = self.clusters.get(cluster).and_then(|s| s.latency.p99_ms()).unwrap_or(0);
        self.after_ms.max(p99.saturating_mul(LATENCY_FACTOR))
    }

    /// Clusters with requests unanswered for longer than their threshold. Each request is
    /// reported once, with the endpoint it was steered to; a cluster is swept at most once per
    /// `SWEEP_INTERVAL_MS` while any of its requests stays stalled.
    pub fn stalled(&mut self, now_ms: u64) -> Vec<Stalled> {
        let mut out: Vec<Stalled> = Vec::new();
        if self.after_ms == 0 {
            return out;
        }
        let mut thresholds: HashMap<String, u64> = HashMap::new();
        for cluster in self.pending.values().filter(|p| !p.answered).filter_map(|p| p.cluster.as_ref()) {
            if !thresholds.contains_key(cluster) {
                thresholds.insert(cluster.clone(), self.threshold_ms(cluster));
            }
        }
        for p in self.pending.values_mut().filter(|p| !p.answered) {
            // Of unknown cluster until `route`: nothing to compare with, nothing to sweep.
            let Some(cluster) = &p.cluster else { continue };
            let threshold = thresholds.get(cluster).copied().unwrap_or(self.after_ms);
            if now_ms.saturating_sub(p.started_ms) <= threshold {
                continue;
            }
            let i = match out.iter().position(|s| s.cluster == *cluster) {
                Some(i) => i,
                None => {
                    let state = self.clusters.get_or_insert_with(cluster, now_ms, ClusterState::default);
                    let sweep = state.is_some_and(|state| {
                        let interval = if state.silence_found_until_ms > now_ms {
                            SWEEP_INTERVAL_ACTIVE_MS.max(threshold.saturating_mul(2))
                        } else {
                            SWEEP_INTERVAL_MS
                        };
                        let due = state.last_sweep_ms.is_none_or(|at| now_ms.saturating_sub(at) >= interval);
                        if due {
                            state.last_sweep_ms = Some(now_ms);
                        }
                        due
                    });
                    out.push(Stalled {
                        cluster: cluster.clone(),
                        sweep_timeout_ms: sweep.then_some(threshold),
                        endpoints: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            if !p.reported {
                p.reported = true;
                if let (Some(s), Some(e)) = (out.get_mut(i), &p.endpoint) {
                    if !s.endpoints.contains(e) {
                        s.endpoints.push(e.clone());
                    }
                }
            }
        }
        out.retain(|s| s.sweep_timeout_ms.is_some() || !s.endpoints.is_empty());
        out
    }

    /// How long an attempt at `cluster` may wait for its answer while endpoints there are being
    /// found silent: `factor` stall thresholds, long enough for anything but the cluster's far
    /// tail; `None` otherwise, or if `factor` is 0. A request stuck on a pod that vanished then
    /// moves on to its next endpoint instead of waiting out the configured per-try timeout.
    pub fn active_per_try_timeout_ms(&self, cluster: &str, now_ms: u64, factor: u64) -> Option<u64> {
        if self.silence_found_until_ms <= now_ms {
            return None;
        }
        let state = self.clusters.get(cluster)?;
        (self.after_ms > 0 && factor > 0 && state.silence_found_until_ms > now_ms)
            .then(|| self.threshold_ms(cluster).saturating_mul(factor))
    }

    /// A sweep of `cluster` found an endpoint silent: more may follow, so sweeps may come at
    /// `SWEEP_INTERVAL_ACTIVE_MS` for `SWEEP_ACTIVE_FOR_MS`.
    pub fn silence_found(&mut self, cluster: &str, now_ms: u64) {
        let until = now_ms.saturating_add(SWEEP_ACTIVE_FOR_MS);
        if let Some(state) = self.clusters.get_or_insert_with(cluster, now_ms, ClusterState::default) {
            state.silence_found_until_ms = until;
            self.silence_found_until_ms = self.silence_found_until_ms.max(until);
        }
    }

    /// A request to `cluster` that Envoy's balancer routed (neither steered nor fallen back)
    /// needed `retries`: past `STALE_LIST_RETRIES`, exploration pauses.
    pub fn balancer_retried(&mut self, cluster: &str, retries: u64, now_ms: u64) {
        if retries < STALE_LIST_RETRIES {
            return;
        }
        let until = now_ms.saturating_add(EXPLORATION_PAUSE_MS);
        if let Some(state) = self.clusters.get_or_insert_with(cluster, now_ms, ClusterState::default) {
            state.exploration_paused_until_ms = until;
            self.exploration_paused_until_ms = self.exploration_paused_until_ms.max(until);
        }
    }

    /// Whether requests to `cluster` may be left to Envoy's balancer to find new endpoints.
    pub fn exploration_paused(&self, cluster: &str, now_ms: u64) -> bool {
        self.exploration_paused_until_ms > now_ms
            && self.clusters.get(cluster).is_some_and(|s| s.exploration_paused_until_ms > now_ms)
    }

    /// Forgets clusters not used for `ttl_ms`, and requests in flight for longer than that: a
    /// request whose end was never reported must not hold a place (or an endpoint's load)
    /// forever.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64) {
        self.clusters.expire(now_ms, ttl_ms);
        let load = &mut self.load;
        self.pending.retain(|_, p| {
            let keep = now_ms.saturating_sub(p.started_ms) < ttl_ms;
            if let (false, Some(e)) = (keep, &p.endpoint) {
                if let Some(n) = load.get_mut(e) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        load.remove(e);
                    }
                }
            }
            keep
        });
    }

    /// No sweep is finding silent endpoints and no cluster's exploration is paused.
    pub fn quiet(&self, now_ms: u64) -> bool {
        self.silence_found_until_ms <= now_ms && self.exploration_paused_until_ms <= now_ms
    }

    pub fn tracked(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const C: &str = "httproute/default/backend/rule/0";

    fn answer(w: &mut InFlight, cluster: &str, started: u64, took: u64) {
        let id = w.begin(cluster, None, started).unwrap_or_default();
        w.answered(id);
        w.end(id, started + took, true);
    }

    #[test]
    fn an_unanswered_request_past_the_floor_stalls_its_cluster_once_per_interval() {
        let mut w = InFlight::new(250);
        let id = w.begin(C, None, 1_000).unwrap_or_default();
        assert!(w.stalled(1_250).is_empty(), "not past the floor yet");
        assert_eq!(
            w.stalled(1_251),
            vec![Stalled { cluster: C.into(), sweep_timeout_ms: Some(250), endpoints: vec![] }]
        );
        assert!(w.stalled(1_900).is_empty(), "one sweep per interval");
        assert_eq!(w.stalled(2_251).len(), 1);
        w.end(id, 2_300, true);
        assert!(w.stalled(9_000).is_empty(), "nothing in flight");
        assert_eq!(w.tracked(), 0);
    }

    #[test]
    fn a_request_of_unknown_cluster_is_watched_as_any_other_once_its_cluster_is_read() {
        let mut w = InFlight::new(100);
        // A slow cluster: p99 64 ms, so its requests stall only past 256 ms.
        for i in 0..50 {
            answer(&mut w, C, i * 10, 40);
        }
        let id = w.begin_unrouted(7, 1_000).unwrap_or_default();
        assert!(w.unrouted_waiting(1_100).is_empty(), "within the floor");
        assert_eq!(w.unrouted_waiting(1_101), vec![(id, 7)], "its cluster is wanted");
        assert!(w.stalled(5_000).is_empty(), "no cluster to compare with or sweep");
        w.route(id, Some(C));
        assert!(w.unrouted_waiting(1_200).is_empty());
        assert!(w.stalled(1_256).is_empty(), "within the slow cluster's threshold");
        assert_eq!(w.stalled(1_257).first().map(|s| s.cluster.as_str()), Some(C));
        // One whose stream is gone by the time its cluster is asked for is dropped.
        let gone = w.begin_unrouted(8, 2_000).unwrap_or_default();
        w.route(gone, None);
        assert_eq!(w.tracked(), 1);
        let answered = w.begin_unrouted(9, 6_000).unwrap_or_default();
        w.answered(answered);
        assert!(w.unrouted_waiting(9_000).is_empty(), "an answered request waits for nothing");
    }

    #[test]
    fn while_sweeps_find_silent_endpoints_the_next_may_come_sooner() {
        let mut w = InFlight::new(100);
        let _ = w.begin(C, None, 1_000);
        assert!(w.stalled(1_101).first().is_some_and(|s| s.sweep_timeout_ms.is_some()));
        let _ = w.begin(C, None, 1_150);
        assert!(w.stalled(1_301).iter().all(|s| s.sweep_timeout_ms.is_none()), "nothing found silent yet");
        w.silence_found(C, 1_201);
        assert!(w.stalled(1_300).iter().all(|s| s.sweep_timeout_ms.is_none()), "not two thresholds yet");
        assert!(
            w.stalled(1_301).first().is_some_and(|s| s.sweep_timeout_ms.is_some()),
            "{SWEEP_INTERVAL_ACTIVE_MS} ms on"
        );
        // Ten seconds without silence found: back to one sweep a second.
        let _ = w.begin(C, None, 11_300);
        assert!(w.stalled(11_401).first().is_some_and(|s| s.sweep_timeout_ms.is_some()));
        assert!(w.stalled(11_700).iter().all(|s| s.sweep_timeout_ms.is_none()));
        assert!(w.stalled(12_401).first().is_some_and(|s| s.sweep_timeout_ms.is_some()));
    }

    #[test]
    fn a_balancer_routed_request_that_needed_several_retries_pauses_exploration() {
        let mut w = InFlight::new(100);
        w.balancer_retried("c", STALE_LIST_RETRIES - 1, 1_000);
        assert!(!w.exploration_paused("c", 1_000), "one retry is ordinary churn");
        w.balancer_retried("c", STALE_LIST_RETRIES, 1_000);
        assert!(w.exploration_paused("c", 1_000));
        assert!(!w.exploration_paused("other", 1_000), "per cluster");
        assert!(w.exploration_paused("c", 1_000 + EXPLORATION_PAUSE_MS - 1));
        assert!(!w.exploration_paused("c", 1_000 + EXPLORATION_PAUSE_MS));
    }

    #[test]
    fn stalled_requests_name_the_endpoints_they_were_steered_to() {
        let mut w = InFlight::new(250);
        let _ = w.begin(C, Some("10.0.0.1:80"), 0);
        let _ = w.begin(C, Some("10.0.0.1:80"), 10);
        let _ = w.begin(C, Some("10.0.0.2:80"), 20);
        let _ = w.begin(C, Some("10.0.0.3:80"), 200); // not stalled yet
        let _ = w.begin(C, None, 30);
        let mut stalled = w.stalled(400);
        assert_eq!(stalled.len(), 1);
        let mut endpoints = stalled.pop().map(|s| s.endpoints).unwrap_or_default();
        endpoints.sort();
        assert_eq!(endpoints, ["10.0.0.1:80", "10.0.0.2:80"], "each once");
        // A request stalling later is reported at once, without waiting for the next sweep.
        let stalled = w.stalled(500);
        assert_eq!(stalled.len(), 1);
        assert_eq!(stalled[0].sweep_timeout_ms, None);
        assert_eq!(stalled[0].endpoints, ["10.0.0.3:80"]);
        assert!(w.stalled(600).is_empty(), "nothing new, no sweep due");
    }

    #[test]
    fn load_counts_steered_requests_until_they_end() {
        let mut w = InFlight::new(0);
        let a = w.begin(C, Some("10.0.0.1:80"), 0).unwrap_or_default();
        let b = w.begin(C, Some("10.0.0.1:80"), 0).unwrap_or_default();
        let _ = w.begin(C, None, 0);
        assert_eq!(w.load("10.0.0.1:80"), 2);
        w.end(a, 5, true);
        w.end(a, 5, true); // ended twice: counted once
        assert_eq!(w.load("10.0.0.1:80"), 1);
        w.end(b, 5, true);
        assert_eq!(w.load("10.0.0.1:80"), 0);
        assert!(w.load.is_empty(), "no entry left behind");
        let _ = w.begin(C, Some("10.0.0.2:80"), 0);
        assert!(w.stalled(60_000).is_empty(), "0 looks for no stalls");
    }

    #[test]
    fn answered_requests_do_not_stall_however_long_their_body_takes() {
        let mut w = InFlight::new(250);
        let id = w.begin(C, None, 0).unwrap_or_default();
        w.answered(id);
        assert!(w.stalled(60_000).is_empty());
    }

    #[test]
    fn a_slow_service_raises_the_threshold() {
        let mut w = InFlight::new(250);
        for i in 0..100 {
            answer(&mut w, C, i * 10, 300);
        }
        // 300 ms sits in [256, 512): p99 bound 512 ms, four times that.
        assert_eq!(w.threshold_ms(C), 2_048);
        let _ = w.begin(C, None, 5_000);
        assert!(w.stalled(6_000).is_empty(), "one second is normal here");
        assert_eq!(w.stalled(7_100).len(), 1);
        assert_eq!(w.threshold_ms("other"), 250, "clusters are apart");
    }

    #[test]
    fn latency_is_forgotten_after_two_windows() {
        let mut w = InFlight::new(100);
        for i in 0..50 {
            answer(&mut w, C, i, 1_000);
        }
        assert_eq!(w.threshold_ms(C), 4 * 1_024);
        // Fast answers for long enough push the slow ones out.
        for i in 0..50 {
            answer(&mut w, C, 25_000 + i, 1);
        }
        assert_eq!(w.threshold_ms(C), 100);
    }

    #[test]
    fn requests_that_needed_retries_do_not_raise_the_threshold() {
        let mut w = InFlight::new(100);
        for i in 0..100 {
            let id = w.begin(C, None, i).unwrap_or_default();
            w.answered(id);
            w.end(id, i + 2_000, false); // answered after a 2 s connect timeout and a retry
        }
        assert_eq!(w.threshold_ms(C), 100);
    }

    #[test]
    fn a_few_samples_do_not_set_the_threshold() {
        let mut w = InFlight::new(250);
        for i in 0..(MIN_SAMPLES as u64 - 1) {
            answer(&mut w, C, i, 5_000);
        }
        assert_eq!(w.threshold_ms(C), 250);
    }

    #[test]
    fn requests_never_reported_ended_are_forgotten_after_the_ttl() {
        let mut w = InFlight::new(100);
        let _ = w.begin(C, Some("10.0.0.1:80"), 0);
        let _ = w.begin(C, Some("10.0.0.1:80"), 500_000);
        w.expire(599_999, 600_000);
        assert_eq!((w.tracked(), w.load("10.0.0.1:80")), (2, 2));
        w.expire(600_000, 600_000);
        assert_eq!((w.tracked(), w.load("10.0.0.1:80")), (1, 1));
    }

    #[test]
    fn tracking_is_bounded() {
        let mut w = InFlight::new(250);
        for _ in 0..MAX_TRACKED {
            assert!(w.begin(C, None, 0).is_some());
        }
        assert_eq!(w.begin(C, None, 0), None);
    }
}
