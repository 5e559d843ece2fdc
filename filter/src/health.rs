//! Per-cluster endpoint health: what was observed, who is ejected and until when.
//!
//! One `ClusterTable` is stored per cluster in proxy-wasm shared data, so every worker
//! thread's VM sees the same ejections. The table is bounded (LRU by last observation)
//! and forgets endpoints that have not been seen for a while: pods come and go, and an
//! address seen once must not cost memory forever.

use crate::config::{Config, EjectionConfig};
use crate::outcome::FailureKind;
use serde::{Deserialize, Serialize};

/// Observations of a healthy endpoint refresh `last_seen_ms` at this resolution only, so the
/// steady state does not write shared data on every request.
pub const LAST_SEEN_RESOLUTION_MS: u64 = 1_000;

const FORMAT_VERSION: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub address: String,
    pub consecutive_local_origin: u16,
    pub consecutive_gateway: u16,
    pub consecutive_5xx: u16,
    /// Ejections in a row; the next ejection lasts `base << level`.
    pub level: u8,
    /// 0 when the endpoint has never been ejected.
    pub ejected_until_ms: u64,
    /// When `level` last decayed; healthy time after this lowers it again.
    pub decay_from_ms: u64,
    pub last_seen_ms: u64,
    /// The last thing seen of this endpoint was an answer. An endpoint whose ejection ran out is
    /// not proven: it failed last time, and nothing has answered from it since.
    pub proven: bool,
    /// An unproven endpoint answered a probe. A probe cannot tell whether the endpoint or Envoy's
    /// balancer in its place answered (an address gone from EDS is skipped), so only a real
    /// request proves it; steering lists it first to find out.
    pub probe_answered: bool,
}

impl EndpointState {
    fn new(address: &str, now_ms: u64) -> Self {
        Self {
            address: address.to_string(),
            consecutive_local_origin: 0,
            consecutive_gateway: 0,
            consecutive_5xx: 0,
            level: 0,
            ejected_until_ms: 0,
            decay_from_ms: now_ms,
            last_seen_ms: now_ms,
            proven: false,
            probe_answered: false,
        }
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms > now_ms
    }

    fn clear_failures(&mut self) {
        self.consecutive_local_origin = 0;
        self.consecutive_gateway = 0;
        self.consecutive_5xx = 0;
    }

    fn has_failures(&self) -> bool {
        self.consecutive_local_origin != 0 || self.consecutive_gateway != 0 || self.consecutive_5xx != 0
    }
}

/// Thresholds and durations, taken from the plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub ejection: EjectionConfig,
    /// 0 disables the no-upstream rule.
    pub consecutive_no_upstream: u32,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        Self {
            ejection: config.ejection.clone(),
            consecutive_no_upstream: config.fallback.as_ref().map_or(0, |f| f.consecutive_no_upstream),
        }
    }

    /// Length of the ejection at `level` (0 for the first): base doubled per level, capped.
    pub fn ejection_ms(&self, level: u8) -> u64 {
        let e = &self.ejection;
        let factor = 1u64.checked_shl(u32::from(level)).unwrap_or(u64::MAX);
        e.base_ejection_ms.saturating_mul(factor).min(e.max_ejection_ms)
    }
}

/// What a finished request tells the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation<'a> {
    Success(&'a str),
    Failure(&'a str, FailureKind),
    /// The cluster had no endpoint at all to offer.
    NoUpstream,
    /// A request needed retries whose endpoints are unknown; worth steering to find out.
    Unattributed,
    /// The endpoint is not in the cluster's endpoint set any more (Envoy skipped it in an
    /// override list); it is forgotten, ejected or not.
    Absent(&'a str),
    /// The endpoint may have failed an attempt, or been skipped: nobody can tell. It counts no
    /// failure, but is no longer proven, so steering puts it last and a probe finds out.
    Suspect(&'a str),
    /// An unproven endpoint answered a probe: alive if it is still in EDS, which only a real
    /// request can show.
    ProbeAnswered(&'a str),
}

/// Counts of a cluster's known endpoints; see `ClusterTable::tally`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub known: usize,
    pub ejected: usize,
    pub unhealthy: usize,
}

/// A cluster's endpoints that are not ejected; see `ClusterTable::candidates`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Candidates<'a> {
    /// Answered a real request since they last failed or were doubted.
    pub proven: Vec<&'a str>,
    /// Answered a probe only: alive if still in EDS.
    pub probe_answered: Vec<&'a str>,
    /// Back from an ejection or doubted, and silent since.
    pub unproven: Vec<&'a str>,
}

/// What applying observations changed, for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub changed: bool,
    pub ejected: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTable {
    /// When an observation last changed the table; a table without live endpoints that has not
    /// changed for the endpoint TTL belongs to a cluster nobody routes to any more.
    pub last_write_ms: u64,
    /// Sorted by address.
    pub endpoints: Vec<EndpointState>,
    pub consecutive_no_upstream: u32,
    /// Set when requests found no endpoint at all; the cluster counts as stale until then.
    pub no_upstream_until_ms: u64,
    /// Set when a retry could not be attributed; steering stays on until then.
    pub suspect_until_ms: u64,
}

impl ClusterTable {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        // Serialising plain structs into a Vec cannot fail; an empty table is a safe answer anyway.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes a stored table. Anything unreadable (another plugin version, corruption) is an
    /// empty table: health is relearned quickly, and the next write replaces it.
    pub fn decode(bytes: &[u8]) -> Self {
        match bytes.split_first() {
            Some((&FORMAT_VERSION, rest)) => postcard::from_bytes(rest).unwrap_or_default(),
            _ => Self::default(),
        }
    }

    pub fn find(&self, address: &str) -> Option<&EndpointState> {
        self.endpoints.binary_search_by(|e| e.address.as_str().cmp(address)).ok().and_then(|i| self.endpoints.get(i))
    }

    pub fn is_ejected(&self, address: &str, now_ms: u64) -> bool {
        self.find(address).is_some_and(|e| e.is_ejected(now_ms))
    }

    /// Endpoints that count as known: seen within the TTL, or still ejected.
    fn live<'a>(&'a self, now_ms: u64, ttl_ms: u64) -> impl Iterator<Item = &'a EndpointState> + 'a {
        self.endpoints.iter().filter(move |e| e.is_ejected(now_ms) || e.last_seen_ms.saturating_add(ttl_ms) > now_ms)
    }

    /// Known endpoints in one pass: how many are ejected, how many are ejected or unproven
    /// (back from an ejection with no answer since, not even to a probe), and how many there are.
    pub fn tally(&self, now_ms: u64, ttl_ms: u64) -> Tally {
        self.live(now_ms, ttl_ms).fold(Tally::default(), |mut t, e| {
            let ejected = e.is_ejected(now_ms);
            t.known += 1;
            t.ejected += usize::from(ejected);
            t.unhealthy += usize::from(ejected || !(e.proven || e.probe_answered));
            t
        })
    }

    /// (ejected, known) endpoints.
    pub fn counts(&self, now_ms: u64, ttl_ms: u64) -> (usize, usize) {
        let t = self.tally(now_ms, ttl_ms);
        (t.ejected, t.known)
    }

    /// Nothing has been learnt about this cluster for `ttl_ms`: no endpoint is known any more and
    /// no observation changed the table since. Its shared state can go.
    pub fn is_expired(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.live(now_ms, ttl_ms).next().is_none() && self.last_write_ms.saturating_add(ttl_ms) <= now_ms
    }

    /// Whether a success could change more than when an endpoint was last seen: some endpoint
    /// has failures, an ejection level, or no answer since its last failure or ejection; or
    /// requests found no endpoint at all.
    pub fn recovering(&self) -> bool {
        self.consecutive_no_upstream > 0 || self.endpoints.iter().any(|e| e.has_failures() || !e.proven || e.level > 0)
    }

    /// Whether any known endpoint is ejected, or back from an ejection and not proven yet.
    pub fn has_trouble(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.live(now_ms, ttl_ms).any(|e| e.is_ejected(now_ms) || !e.proven)
    }

    /// Endpoints back from an ejection or doubt that nothing has answered for since: candidates
    /// for probes.
    pub fn unproven_addresses(&self, now_ms: u64, ttl_ms: u64) -> Vec<&str> {
        self.live(now_ms, ttl_ms)
            .filter(|e| !e.is_ejected(now_ms) && !e.proven && !e.probe_answered)
            .map(|e| e.address.as_str())
            .collect()
    }

    pub fn ejected_addresses(&self, now_ms: u64) -> impl Iterator<Item = &str> {
        self.endpoints.iter().filter(move |e| e.is_ejected(now_ms)).map(|e| e.address.as_str())
    }

    /// Endpoints not ejected, by what is known of them.
    pub fn candidates(&self, now_ms: u64, ttl_ms: u64) -> Candidates<'_> {
        let mut c = Candidates::default();
        for e in self.live(now_ms, ttl_ms).filter(|e| !e.is_ejected(now_ms)) {
            let class = match (e.proven, e.probe_answered) {
                (true, _) => &mut c.proven,
                (false, true) => &mut c.probe_answered,
                (false, false) => &mut c.unproven,
            };
            class.push(e.address.as_str());
        }
        c
    }

    /// Whether applying `obs` would change the table. Lets the hot path skip the shared-data
    /// round trip for the common case: a healthy endpoint answered again.
    pub fn would_change(&self, obs: &Observation<'_>, now_ms: u64) -> bool {
        match obs {
            Observation::Success(addr) => match self.find(addr) {
                None => true,
                Some(e) => {
                    e.has_failures()
                        || !e.proven
                        || e.level > 0
                        || now_ms.saturating_sub(e.last_seen_ms) >= LAST_SEEN_RESOLUTION_MS
                        || self.consecutive_no_upstream > 0
                }
            },
            Observation::Unattributed => self.suspect_until_ms <= now_ms,
            Observation::Absent(addr) => self.find(addr).is_some(),
            Observation::Suspect(addr) => self.find(addr).is_some_and(|e| e.proven || e.probe_answered),
            Observation::ProbeAnswered(addr) => self.find(addr).is_some_and(|e| !e.proven && !e.probe_answered),
            _ => true,
        }
    }

    /// Applies one observation under `policy`.
    pub fn apply(&mut self, obs: &Observation<'_>, now_ms: u64, policy: &Policy, suspect_ms: u64) -> Applied {
        let mut applied = Applied::default();
        match *obs {
            Observation::Success(addr) => {
                if self.consecutive_no_upstream != 0 {
                    self.consecutive_no_upstream = 0;
                    applied.changed = true;
                }
                let base = policy.ejection.base_ejection_ms;
                let Some(e) = self.entry(addr, now_ms, policy, &mut applied) else { return applied };
                if e.has_failures() || !e.proven {
                    e.clear_failures();
                    e.proven = true;
                    e.probe_answered = false;
                    applied.changed = true;
                }
                if e.level > 0 && !e.is_ejected(now_ms) {
                    let healthy_since = e.decay_from_ms.max(e.ejected_until_ms);
                    if now_ms.saturating_sub(healthy_since) >= base {
                        e.level -= 1;
                        e.decay_from_ms = now_ms;
                        applied.changed = true;
                    }
                }
                if now_ms.saturating_sub(e.last_seen_ms) >= LAST_SEEN_RESOLUTION_MS {
                    e.last_seen_ms = now_ms;
                    applied.changed = true;
                }
            }
            Observation::Failure(addr, kind) => {
                let Some(e) = self.entry(addr, now_ms, policy, &mut applied) else { return applied };
                applied.changed = true;
                e.last_seen_ms = now_ms;
                e.proven = false;
                e.probe_answered = false;
                // Requests in flight when the endpoint was ejected still report; they do not
                // extend the ejection.
                if !e.is_ejected(now_ms) {
                    bump(&mut e.consecutive_5xx);
                    if kind.is_local_origin() {
                        bump(&mut e.consecutive_local_origin);
                    } else if kind.is_gateway_error() {
                        bump(&mut e.consecutive_gateway);
                    }
                    let p = &policy.ejection;
                    let trips = |count: u16, threshold: u32| threshold != 0 && u32::from(count) >= threshold;
                    if trips(e.consecutive_local_origin, p.consecutive_local_origin_failures)
                        || trips(e.consecutive_gateway, p.consecutive_gateway_errors)
                        || trips(e.consecutive_5xx, p.consecutive_5xx)
                    {
                        let duration = policy.ejection_ms(e.level);
                        e.ejected_until_ms = now_ms.saturating_add(duration);
                        e.level = e.level.saturating_add(1).min(63);
                        e.decay_from_ms = e.ejected_until_ms;
                        e.clear_failures();
                        applied.ejected.push((e.address.clone(), duration));
                    }
                }
            }
            Observation::NoUpstream => {
                applied.changed = true;
                self.consecutive_no_upstream = self.consecutive_no_upstream.saturating_add(1);
                let threshold = policy.consecutive_no_upstream;
                if threshold != 0 && self.consecutive_no_upstream >= threshold {
                    self.no_upstream_until_ms = now_ms.saturating_add(policy.ejection.base_ejection_ms);
                }
            }
            Observation::Suspect(addr) => {
                if let Ok(i) = self.endpoints.binary_search_by(|e| e.address.as_str().cmp(addr)) {
                    if let Some(e) = self.endpoints.get_mut(i).filter(|e| e.proven || e.probe_answered) {
                        e.proven = false;
                        e.probe_answered = false;
                        applied.changed = true;
                    }
                }
            }
            // Neither proves the endpoint nor refreshes `last_seen_ms`: that the address is
            // still in EDS is not shown by a probe.
            // Failure counts stay: an endpoint that answers probes but fails real requests must
            // still reach its ejection threshold.
            Observation::ProbeAnswered(addr) => {
                if let Ok(i) = self.endpoints.binary_search_by(|e| e.address.as_str().cmp(addr)) {
                    if let Some(e) = self.endpoints.get_mut(i).filter(|e| !e.proven && !e.probe_answered) {
                        e.probe_answered = true;
                        applied.changed = true;
                    }
                }
            }
            Observation::Absent(addr) => {
                if let Ok(i) = self.endpoints.binary_search_by(|e| e.address.as_str().cmp(addr)) {
                    self.endpoints.remove(i);
                    applied.changed = true;
                }
            }
            Observation::Unattributed => {
                if self.suspect_until_ms <= now_ms {
                    applied.changed = true;
                }
                self.suspect_until_ms = self.suspect_until_ms.max(now_ms.saturating_add(suspect_ms));
            }
        }
        if applied.changed {
            self.forget_expired(now_ms, policy.ejection.endpoint_ttl_ms);
            self.last_write_ms = now_ms;
        }
        applied
    }

    /// The entry for `address`, created if new; evicts the least recently seen endpoint when full.
    fn entry(
        &mut self,
        address: &str,
        now_ms: u64,
        policy: &Policy,
        applied: &mut Applied,
    ) -> Option<&mut EndpointState> {
        let idx = match self.endpoints.binary_search_by(|e| e.address.as_str().cmp(address)) {
            Ok(i) => i,
            Err(mut at) => {
                applied.changed = true;
                let cap = usize::try_from(policy.ejection.max_endpoints_per_cluster).unwrap_or(usize::MAX).max(1);
                if self.endpoints.len() >= cap {
                    if let Some(oldest) = self.least_recently_seen() {
                        self.endpoints.remove(oldest);
                        if oldest < at {
                            at -= 1;
                        }
                    }
                }
                self.endpoints.insert(at, EndpointState::new(address, now_ms));
                at
            }
        };
        self.endpoints.get_mut(idx)
    }

    fn least_recently_seen(&self) -> Option<usize> {
        self.endpoints.iter().enumerate().min_by_key(|(_, e)| e.last_seen_ms).map(|(i, _)| i)
    }

    fn forget_expired(&mut self, now_ms: u64, ttl_ms: u64) {
        self.endpoints.retain(|e| e.is_ejected(now_ms) || e.last_seen_ms.saturating_add(ttl_ms) > now_ms);
    }
}

fn bump(counter: &mut u16) {
    *counter = counter.saturating_add(1);
}

/// What a finished steered request says about the override-list entries before its final
/// endpoint.
///
/// Envoy reports the last attempt's endpoint and the attempt count, nothing about earlier
/// attempts. Its `override_host` policy consumes the list in order, one entry per attempt, and
/// skips entries that are not in the cluster (no longer in EDS) without an attempt; once the
/// list is used up, the cluster's own load balancer picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steered<'a> {
    /// The first attempt went past these entries: Envoy skipped them, which it does only for
    /// addresses it does not have.
    Absent(&'a [String]),
    /// There were exactly as many retries as entries before the final endpoint: none can have
    /// been skipped, so each failed an attempt.
    Failed(&'a [String]),
    /// Retries, but some entries were skipped too (or the balancer served in the end, after an
    /// unknown mix): which failed cannot be told, and nobody is blamed.
    Suspect(&'a [String]),
}

pub fn attribute_steered<'a>(steered: &'a [String], final_address: &str, attempts: u64) -> Steered<'a> {
    let retries = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    let position = steered.iter().position(|a| a == final_address);
    let before = position.and_then(|k| steered.get(..k)).unwrap_or(steered);
    match position {
        _ if retries == 0 => Steered::Absent(before),
        Some(k) if k == retries => Steered::Failed(before),
        _ => Steered::Suspect(before),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn failed_steered<'a>(steered: &'a [String], final_address: &str, attempts: u64) -> &'a [String] {
        match attribute_steered(steered, final_address, attempts) {
            Steered::Failed(s) => s,
            _ => &[],
        }
    }

    fn absent_steered<'a>(steered: &'a [String], final_address: &str, attempts: u64) -> &'a [String] {
        match attribute_steered(steered, final_address, attempts) {
            Steered::Absent(s) => s,
            _ => &[],
        }
    }

    fn suspect_steered<'a>(steered: &'a [String], final_address: &str, attempts: u64) -> &'a [String] {
        match attribute_steered(steered, final_address, attempts) {
            Steered::Suspect(s) => s,
            _ => &[],
        }
    }

    const A: &str = "10.0.0.1:8080";
    const B: &str = "10.0.0.2:8080";
    const C: &str = "10.0.0.3:8080";

    fn policy() -> Policy {
        Policy::from_config(&Config::default())
    }

    fn fail(t: &mut ClusterTable, addr: &str, now: u64) -> Applied {
        t.apply(&Observation::Failure(addr, FailureKind::ConnectFailure), now, &policy(), 10_000)
    }

    fn ok(t: &mut ClusterTable, addr: &str, now: u64) -> Applied {
        t.apply(&Observation::Success(addr), now, &policy(), 10_000)
    }

    #[test]
    fn one_connect_failure_ejects() {
        let mut t = ClusterTable::default();
        ok(&mut t, A, 1_000);
        let applied = fail(&mut t, A, 2_000);
        assert_eq!(applied.ejected, vec![(A.to_string(), 10_000)]);
        assert!(t.is_ejected(A, 2_001));
        assert!(t.is_ejected(A, 11_999));
        assert!(!t.is_ejected(A, 12_000), "returns when the ejection expires");
    }

    #[test]
    fn gateway_errors_need_consecutive_failures() {
        let mut t = ClusterTable::default();
        let p = policy();
        for now in [1, 2] {
            t.apply(&Observation::Failure(A, FailureKind::GatewayError), now, &p, 0);
        }
        ok(&mut t, A, 3);
        for now in [4, 5] {
            t.apply(&Observation::Failure(A, FailureKind::Reset), now, &p, 0);
        }
        assert!(!t.is_ejected(A, 6), "a success in between resets the streak");
        t.apply(&Observation::Failure(A, FailureKind::Timeout), 6, &p, 0);
        assert!(t.is_ejected(A, 7));
    }

    #[test]
    fn server_errors_only_count_when_enabled() {
        let mut t = ClusterTable::default();
        let mut p = policy();
        for now in 1..=20 {
            t.apply(&Observation::Failure(A, FailureKind::ServerError), now, &p, 0);
        }
        assert!(!t.is_ejected(A, 21));
        p.ejection.consecutive_5xx = 2;
        t.apply(&Observation::Failure(A, FailureKind::ServerError), 22, &p, 0);
        assert!(t.is_ejected(A, 23));
    }

    #[test]
    fn ejection_backs_off_exponentially_up_to_the_maximum() {
        let mut t = ClusterTable::default();
        let mut now = 0;
        let mut durations = vec![];
        for _ in 0..8 {
            let applied = fail(&mut t, A, now);
            let (_, d) = applied.ejected.first().cloned().unwrap_or_default();
            durations.push(d);
            now += d; // fails again as soon as it returns
        }
        assert_eq!(durations, vec![10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000]);
    }

    #[test]
    fn failures_while_ejected_do_not_extend() {
        let mut t = ClusterTable::default();
        fail(&mut t, A, 0);
        let applied = fail(&mut t, A, 5_000);
        assert!(applied.ejected.is_empty());
        assert!(!t.is_ejected(A, 10_000));
    }

    #[test]
    fn healthy_time_decays_the_backoff() {
        let mut t = ClusterTable::default();
        fail(&mut t, A, 0); // level 1, back at 10s
        fail(&mut t, A, 10_000); // level 2, back at 30s
        ok(&mut t, A, 30_000);
        assert_eq!(t.find(A).map(|e| e.level), Some(2));
        ok(&mut t, A, 40_000);
        assert_eq!(t.find(A).map(|e| e.level), Some(1));
        ok(&mut t, A, 50_000);
        assert_eq!(t.find(A).map(|e| e.level), Some(0));
        let applied = fail(&mut t, A, 60_000);
        assert_eq!(applied.ejected, vec![(A.to_string(), 10_000)], "back to the base ejection");
    }

    #[test]
    fn counts_and_addresses() {
        let mut t = ClusterTable::default();
        for a in [A, B, C] {
            ok(&mut t, a, 0);
        }
        fail(&mut t, B, 100);
        assert_eq!(t.counts(200, 600_000), (1, 3));
        assert_eq!(t.candidates(200, 600_000), Candidates { proven: vec![A, C], ..Candidates::default() });
        assert_eq!(t.ejected_addresses(200).collect::<Vec<_>>(), vec![B]);
    }

    #[test]
    fn back_from_ejection_is_unproven_until_it_answers() {
        let mut t = ClusterTable::default();
        ok(&mut t, A, 0);
        ok(&mut t, B, 0);
        fail(&mut t, B, 100);
        assert_eq!(t.tally(200, 600_000).unhealthy, 1);
        // The ejection ran out: B is back in rotation, last, and still counts as unhealthy.
        let c = t.candidates(20_000, 600_000);
        assert_eq!((c.proven, c.unproven), (vec![A], vec![B]));
        assert_eq!(t.tally(20_000, 600_000).unhealthy, 1);
        assert_eq!(t.unproven_addresses(20_000, 600_000), vec![B]);
        ok(&mut t, B, 20_001);
        assert_eq!(t.tally(20_002, 600_000).unhealthy, 0);
        assert!(t.unproven_addresses(20_002, 600_000).is_empty());
    }

    #[test]
    fn a_probe_answer_does_not_prove_the_endpoint_is_still_in_eds() {
        let p = policy();
        let mut t = ClusterTable::default();
        ok(&mut t, A, 0);
        ok(&mut t, B, 0);
        fail(&mut t, B, 100);
        assert!(t.would_change(&Observation::ProbeAnswered(B), 20_000));
        assert!(t.apply(&Observation::ProbeAnswered(B), 20_000, &p, 0).changed);
        let e = t.find(B).cloned().unwrap_or_else(|| unreachable!());
        assert!(!e.proven && e.probe_answered && e.last_seen_ms == 100, "{e:?}");
        assert!(!t.would_change(&Observation::ProbeAnswered(B), 20_001));
        assert!(t.unproven_addresses(20_001, 600_000).is_empty(), "not probed again");
        assert_eq!(t.tally(20_001, 600_000).unhealthy, 0, "alive as far as the fallback is concerned");
        assert!(t.has_trouble(20_001, 600_000), "steering stays on until a real request decides");
        assert_eq!(t.candidates(20_001, 600_000).probe_answered, vec![B]);
        // A probe answered for an address Envoy no longer has keeps nothing alive.
        assert!(t.find(B).is_some() && t.tally(100 + 600_000, 600_000).known == 0);
        // A real answer proves it; a doubt undoes the probe.
        ok(&mut t, B, 20_002);
        assert!(t.find(B).is_some_and(|e| e.proven && !e.probe_answered));
        assert!(!t.would_change(&Observation::ProbeAnswered(B), 20_003), "already proven");
        t.apply(&Observation::Suspect(B), 20_004, &p, 0);
        t.apply(&Observation::ProbeAnswered(B), 20_005, &p, 0);
        t.apply(&Observation::Suspect(B), 20_006, &p, 0);
        assert!(t.find(B).is_some_and(|e| !e.proven && !e.probe_answered));
        assert!(!t.would_change(&Observation::ProbeAnswered(C), 20_007), "probes add no endpoints");
    }

    #[test]
    fn probe_answers_do_not_reset_failures_of_real_requests() {
        let p = policy();
        let gateway =
            |t: &mut ClusterTable, now| t.apply(&Observation::Failure(A, FailureKind::GatewayError), now, &p, 0);
        let mut t = ClusterTable::default();
        ok(&mut t, A, 0);
        for now in 1..=2 {
            gateway(&mut t, now);
            t.apply(&Observation::ProbeAnswered(A), now, &p, 0);
        }
        let applied = gateway(&mut t, 3);
        assert_eq!(applied.ejected.len(), 1, "up to probes, failing to real requests: third strike");
    }

    #[test]
    fn memory_is_bounded_by_lru() {
        let mut p = policy();
        p.ejection.max_endpoints_per_cluster = 16;
        let mut t = ClusterTable::default();
        for i in 0..10_000u64 {
            let addr = format!("10.1.{}.{}:80", i / 256, i % 256);
            t.apply(&Observation::Success(&addr), i * 1_000, &p, 0);
        }
        assert_eq!(t.endpoints.len(), 16);
        assert!(t.find("10.1.39.15:80").is_some(), "the most recent stays");
        assert!(t.find("10.1.0.0:80").is_none(), "the oldest went");
        assert!(t.encode().len() < 16 * 64);
    }

    #[test]
    fn unseen_endpoints_are_forgotten_but_ejected_ones_kept() {
        let mut t = ClusterTable::default();
        ok(&mut t, A, 0);
        fail(&mut t, B, 0);
        ok(&mut t, C, 700_000);
        assert!(t.find(A).is_none());
        assert!(t.find(B).is_none(), "its ejection ended long ago");
        fail(&mut t, B, 700_000);
        ok(&mut t, C, 705_000);
        assert!(t.find(B).is_some());
    }

    #[test]
    fn steady_state_needs_no_write() {
        let mut t = ClusterTable::default();
        ok(&mut t, A, 0);
        assert!(!t.would_change(&Observation::Success(A), 500));
        assert!(t.would_change(&Observation::Success(A), 1_500));
        assert!(t.would_change(&Observation::Success(B), 500));
        assert!(t.would_change(&Observation::Failure(A, FailureKind::Reset), 500));
        let before = t.clone();
        let applied = ok(&mut t, A, 500);
        assert!(!applied.changed);
        assert_eq!(t, before);
    }

    #[test]
    fn no_upstream_streak_marks_the_cluster_stale() {
        let mut t = ClusterTable::default();
        let mut p = policy();
        p.consecutive_no_upstream = 2;
        t.apply(&Observation::NoUpstream, 0, &p, 0);
        assert_eq!(t.no_upstream_until_ms, 0);
        t.apply(&Observation::NoUpstream, 1, &p, 0);
        assert_eq!(t.no_upstream_until_ms, 10_001);
        t.apply(&Observation::Success(A), 2, &p, 0);
        assert_eq!(t.consecutive_no_upstream, 0);
    }

    #[test]
    fn unattributed_retries_make_the_cluster_suspect() {
        let mut t = ClusterTable::default();
        let applied = t.apply(&Observation::Unattributed, 100, &policy(), 5_000);
        assert!(applied.changed);
        assert_eq!(t.suspect_until_ms, 5_100);
        assert!(!t.would_change(&Observation::Unattributed, 200));
    }

    #[test]
    fn encode_decode_round_trip_and_garbage() {
        let mut t = ClusterTable::default();
        ok(&mut t, A, 1);
        fail(&mut t, B, 2);
        assert_eq!(ClusterTable::decode(&t.encode()), t);
        assert_eq!(ClusterTable::decode(&[]), ClusterTable::default());
        assert_eq!(ClusterTable::decode(&[9, 1, 2]), ClusterTable::default());
        assert_eq!(ClusterTable::decode(&[FORMAT_VERSION, 0xff, 0xff]), ClusterTable::default());
        let mut truncated = t.encode();
        truncated.truncate(truncated.len() / 2);
        assert_eq!(ClusterTable::decode(&truncated), ClusterTable::default());
    }

    #[test]
    fn attribution_of_steered_attempts() {
        let list: Vec<String> = [A, B, C].iter().map(|s| s.to_string()).collect();
        // Served by the first entry at the first attempt: nothing failed.
        assert!(failed_steered(&list, A, 1).is_empty());
        // Two retries and the third entry answered: the first two failed one attempt each.
        assert_eq!(failed_steered(&list, C, 3), &list[..2]);
        assert!(failed_steered(&[], A, 1).is_empty());
    }

    #[test]
    fn ambiguous_retries_make_suspects_not_failures() {
        let list = [A.to_string(), B.to_string(), C.to_string()];
        // Exact: A and B failed, nobody is merely suspect.
        assert!(suspect_steered(&list, C, 3).is_empty());
        // One retry, C at the third place: A or B was skipped, the other failed.
        assert_eq!(suspect_steered(&list, C, 2), &list[..2]);
        assert_eq!(suspect_steered(&list, "10.9.9.9:80", 3), &list[..]);
        assert!(suspect_steered(&list, C, 1).is_empty(), "no retry, nothing failed");

        let p = policy();
        let mut t = ClusterTable::default();
        ok(&mut t, A, 1_000);
        assert!(t.would_change(&Observation::Suspect(A), 1_001));
        t.apply(&Observation::Suspect(A), 1_001, &p, 0);
        let e = t.find(A).cloned().unwrap_or_else(|| unreachable!());
        assert!(!e.proven && !t.is_ejected(A, 1_002) && !e.has_failures(), "unproven, nothing counted");
        assert!(!t.would_change(&Observation::Suspect(A), 1_003));
        assert!(!t.would_change(&Observation::Suspect(B), 1_003), "unknown endpoints are not added");
        ok(&mut t, A, 1_004);
        assert!(t.find(A).is_some_and(|e| e.proven), "an answer proves it again");
    }

    #[test]
    fn entries_skipped_before_the_first_attempt_are_absent() {
        let list = [A.to_string(), B.to_string(), C.to_string()];
        assert!(absent_steered(&list, A, 1).is_empty());
        assert_eq!(absent_steered(&list, C, 1), &list[..2], "the first attempt went to the third entry");
        assert_eq!(absent_steered(&list, "10.9.9.9:80", 1), &list[..], "the balancer served the first attempt");
        // With retries, skipped and failed entries cannot be told apart.
        assert!(absent_steered(&list, C, 2).is_empty());
        assert!(absent_steered(&list, "10.9.9.9:80", 3).is_empty());

        let mut t = ClusterTable::default();
        ok(&mut t, A, 1_000);
        fail(&mut t, B, 1_000);
        let p = policy();
        assert!(t.would_change(&Observation::Absent(B), 1_001));
        assert!(t.apply(&Observation::Absent(B), 1_001, &p, 0).changed);
        assert!(t.find(B).is_none() && !t.is_ejected(B, 1_002), "an absent endpoint is forgotten, ejection and all");
        assert!(!t.would_change(&Observation::Absent(B), 1_003));
        assert!(t.find(A).is_some());
    }

    #[test]
    fn skipped_entries_make_attribution_impossible() {
        let list = [A.to_string(), B.to_string(), C.to_string()];
        // C answered after one retry: A or B was not in EDS and was skipped, the other failed.
        // Which is which cannot be told, so neither is blamed.
        assert!(failed_steered(&list, C, 2).is_empty());
        // Served by Envoy's balancer after the list: skipped or failed entries, in an unknown mix.
        assert!(failed_steered(&list, "10.9.9.9:80", 3).is_empty());
        assert!(failed_steered(&list, "10.9.9.9:80", 4).is_empty());
        // More retries than entries before the final one: the balancer served, and a later
        // retry happened to land on a listed endpoint.
        assert!(failed_steered(&list, A, 3).is_empty());
    }

    #[test]
    fn a_cluster_expires_once_nothing_is_known_or_learnt_for_the_ttl() {
        let p = policy();
        let ttl = p.ejection.endpoint_ttl_ms;
        let mut t = ClusterTable::default();
        assert!(t.is_expired(ttl, ttl), "an empty, never written table");
        ok(&mut t, A, 1_000);
        assert!(!t.is_expired(1_000 + ttl - 1, ttl));
        assert!(t.is_expired(1_000 + ttl, ttl));
        let mut t = ClusterTable::default();
        t.apply(&Observation::NoUpstream, 5_000, &p, 0);
        assert!(!t.is_expired(5_000 + ttl - 1, ttl), "no endpoints, but recently observed");
        assert!(t.is_expired(5_000 + ttl, ttl));
    }
}
