//! What to do with one request, from the plugin configuration, the cluster's health table and
//! the retry budget. Pure, so every rule is unit-tested without a host.

use crate::config::Config;
use crate::health::ClusterTable;
use crate::rng::Rng;

/// Retry conditions that are safe whatever the method: the endpoint never saw the request.
pub const RETRY_ON_UNSENT: &str = "connect-failure,refused-stream,reset-before-request";
/// For idempotent methods a reset after sending is retried too, and so are the retriable
/// statuses (`RetryConfig::idempotent_retry_on`).
pub const RETRY_ON_IDEMPOTENT_NO_CODES: &str = "connect-failure,refused-stream,reset";

/// Request facts the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The request already carries `x-envoy-retry-on`, `x-envoy-retry-grpc-on` or
    /// `x-envoy-max-retries`, from a client the configuration trusts.
    pub has_retry_headers: bool,
    /// The request already carries the override header (someone else steers it).
    pub has_override_header: bool,
    /// A gRPC call (`content-type: application/grpc...`): its failures are gRPC statuses.
    pub grpc: bool,
    /// Requests Envoy's balancer routed to this cluster lately needed several retries: its
    /// endpoint list is mostly dead, and none is left to it to explore.
    pub exploration_paused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPlan<'a> {
    pub retry_on: &'a str,
    pub max_retries: u32,
    /// `x-envoy-retriable-status-codes`, for idempotent requests.
    pub status_codes: Option<&'a str>,
    /// `x-envoy-retry-grpc-on`, for gRPC calls.
    pub grpc_retry_on: Option<&'a str>,
    pub per_try_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision<'a> {
    pub fallback: bool,
    pub retry: Option<RetryPlan<'a>>,
    /// Endpoints for the override header, first attempt first. Empty: do not steer.
    pub steer: Vec<String>,
    /// Retries were wanted but the budget refused them.
    pub budget_exhausted: bool,
}

pub fn is_idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// Whether the cluster's endpoint set looks too stale to use.
pub fn fallback_active(config: &Config, table: &ClusterTable, now_ms: u64) -> bool {
    let Some(fallback) = &config.fallback else { return false };
    if table.no_upstream_until_ms > now_ms {
        return true;
    }
    let ttl = config.ejection.endpoint_ttl_ms;
    let t = table.tally(now_ms, ttl);
    // With steering, endpoints back from an ejection must answer a probe before they count as
    // healthy; without it nothing probes them, so their ejection running out has to do.
    let unhealthy = if config.endpoint_override.is_some() { t.unhealthy } else { t.ejected };
    t.known > 0 && unhealthy as f64 >= fallback.ejected_share * t.known as f64
}

/// Whether requests to the cluster would be steered, unless left to the balancer to explore:
/// some endpoint is ejected or unproven, or a retry went unattributed lately.
fn troubled(config: &Config, table: &ClusterTable, now_ms: u64) -> bool {
    let ttl = config.ejection.endpoint_ttl_ms;
    table.suspect_until_ms > now_ms || table.has_trouble(now_ms, ttl)
}

/// Whether what is known of a cluster would make any request there differ from one to a
/// cluster nothing is known of: steered, or sent to the fallback.
pub fn needs_decisions(config: &Config, table: &ClusterTable, now_ms: u64) -> bool {
    fallback_active(config, table, now_ms) || (config.endpoint_override.is_some() && troubled(config, table, now_ms))
}

/// Decides for one request. `retries_available` is what the budget allows right now; `load`
/// counts the requests in flight steered to an endpoint.
pub fn decide<'c>(
    config: &'c Config,
    facts: &RequestFacts<'_>,
    table: &ClusterTable,
    now_ms: u64,
    retries_available: u32,
    rng: &mut Rng,
    load: &dyn Fn(&str) -> u32,
) -> Decision<'c> {
    let mut decision = Decision { fallback: fallback_active(config, table, now_ms), ..Decision::default() };

    let r = &config.retry;
    if r.enabled && !facts.has_retry_headers && r.max_retries > 0 {
        let max_retries = r.max_retries.min(retries_available);
        if max_retries == 0 {
            decision.budget_exhausted = true;
        } else if facts.grpc {
            // gRPC calls are POSTs whose failures arrive as HTTP 200: retried when nothing
            // reached the endpoint, and on the gRPC statuses configured.
            decision.retry = Some(RetryPlan {
                retry_on: if r.grpc_idempotent { RETRY_ON_IDEMPOTENT_NO_CODES } else { RETRY_ON_UNSENT },
                max_retries,
                status_codes: None,
                grpc_retry_on: r.grpc_retry_on_header.as_deref(),
                per_try_timeout_ms: r.per_try_timeout_ms,
            });
        } else if is_idempotent(facts.method) {
            decision.retry = Some(RetryPlan {
                retry_on: &r.idempotent_retry_on,
                max_retries,
                status_codes: r.status_codes_header.as_deref(),
                grpc_retry_on: None,
                per_try_timeout_ms: r.per_try_timeout_ms,
            });
        } else {
            decision.retry = Some(RetryPlan {
                retry_on: RETRY_ON_UNSENT,
                max_retries,
                status_codes: None,
                grpc_retry_on: None,
                per_try_timeout_ms: r.per_try_timeout_ms,
            });
        }
    }

    if let Some(o) = &config.endpoint_override {
        let ttl = config.ejection.endpoint_ttl_ms;
        if !decision.fallback
            && !facts.has_override_header
            // One pass, no allocation, for the common case: nothing is wrong, nothing to steer.
            && troubled(config, table, now_ms)
            && (facts.exploration_paused || !rng.chance(o.explore_ratio))
        {
            let c = table.candidates(now_ms, ttl);
            let attempts = decision.retry.as_ref().map_or(1, |p| p.max_retries as usize + 1);
            // Endpoints that answered only a probe go first: a real request shows whether they
            // are still in EDS (Envoy skips them at no cost if not). Then those proven alive;
            // those back from an ejection and silent since come last.
            // Within each class, the fewest requests waiting first, as Envoy's least-request
            // balancer would choose: requests pile up at an endpoint that vanished. The sort is
            // stable, so equal loads keep their random order.
            let mut steer = Vec::with_capacity(attempts);
            for class in [c.probe_answered, c.proven, c.unproven] {
                let mut picked = sample(class, attempts - steer.len(), rng);
                picked.sort_by_key(|a| load(a));
                steer.extend(picked);
            }
            decision.steer = steer;
        }
    }
    decision
}

/// Up to `n` of `items` in random order (partial Fisher-Yates).
fn sample(mut items: Vec<&str>, n: usize, rng: &mut Rng) -> Vec<String> {
    let n = n.min(items.len());
    for i in 0..n {
        let j = i + rng.below(items.len() - i);
        items.swap(i, j);
    }
    items.into_iter().take(n).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::health::{Observation, Policy};
    use crate::outcome::FailureKind;

    const GET: RequestFacts<'static> = RequestFacts {
        method: "GET",
        has_retry_headers: false,
        has_override_header: false,
        grpc: false,
        exploration_paused: false,
    };

    fn table(healthy: &[&str], ejected: &[&str]) -> ClusterTable {
        let policy = Policy::from_config(&Config::default());
        let mut t = ClusterTable::default();
        for a in healthy {
            t.apply(&Observation::Success(a), 0, &policy, 0);
        }
        for a in ejected {
            t.apply(&Observation::Failure(a, FailureKind::ConnectFailure), 0, &policy, 0);
        }
        t
    }

    fn idle(_: &str) -> u32 {
        0
    }

    fn steering() -> &'static Config {
        static STEERING: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
        STEERING.get_or_init(|| Config::parse(br#"{"endpointOverride":{"exploreRatio":0}}"#).unwrap_or_default())
    }

    #[test]
    fn defaults_retry_gets_on_everything_that_is_safe() {
        let defaults = Config::default();
        let d = decide(&defaults, &GET, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        let plan = d.retry.unwrap_or_else(|| unreachable!());
        // 502, 503 and 504 as Envoy's `gateway-error`: no status codes header to write.
        assert_eq!(plan.retry_on, "connect-failure,refused-stream,reset,gateway-error");
        assert_eq!(plan.max_retries, 10);
        assert_eq!(plan.status_codes, None);
        assert!(d.steer.is_empty() && !d.fallback);
    }

    #[test]
    fn post_is_retried_only_when_nothing_was_sent() {
        let post = RequestFacts { method: "POST", ..GET };
        let defaults = Config::default();
        let d = decide(&defaults, &post, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        let plan = d.retry.unwrap_or_else(|| unreachable!());
        assert_eq!(plan.retry_on, RETRY_ON_UNSENT);
        assert!(!plan
            .retry_on
            .split(',')
            .any(|c| matches!(c, "reset" | "retriable-status-codes" | "5xx" | "gateway-error")));
        assert_eq!(plan.status_codes, None);
        assert!(!is_idempotent("PATCH"));
    }

    #[test]
    fn grpc_calls_retry_on_grpc_statuses_not_http_codes() {
        let call = RequestFacts { method: "POST", grpc: true, ..GET };
        let config = Config::default();
        let d = decide(&config, &call, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        let plan = d.retry.unwrap_or_else(|| unreachable!());
        assert_eq!(plan.retry_on, RETRY_ON_UNSENT, "a reset after the call was sent may have run it");
        assert_eq!(plan.grpc_retry_on, Some("cancelled,unavailable"));
        assert_eq!(plan.status_codes, None, "gRPC failures are HTTP 200s");
        let none = Config::parse(br#"{"retry":{"grpcRetryOn":[]}}"#).unwrap_or_default();
        let d = decide(&none, &call, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        assert_eq!(d.retry.map(|p| (p.retry_on, p.grpc_retry_on)), Some((RETRY_ON_UNSENT, None)));
        let plain = decide(&config, &GET, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        assert_eq!(plain.retry.and_then(|p| p.grpc_retry_on), None);
        let idempotent = Config::parse(br#"{"retry":{"grpcIdempotent":true}}"#).unwrap_or_default();
        let d = decide(&idempotent, &call, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        let plan = d.retry.unwrap_or_else(|| unreachable!());
        assert!(plan.retry_on.split(',').any(|c| c == "reset"), "{}", plan.retry_on);
        assert_eq!(plan.grpc_retry_on, Some("cancelled,unavailable"));
    }

    #[test]
    fn only_a_table_that_would_steer_or_fall_back_needs_decisions() {
        let ejected = table(&["10.0.0.1:80"], &["10.0.0.2:80"]);
        assert!(!needs_decisions(&Config::default(), &ejected, 1), "`{{}}` neither steers nor falls back");
        assert!(needs_decisions(steering(), &ejected, 1), "steering avoids the ejected endpoint");
        assert!(!needs_decisions(steering(), &table(&["10.0.0.1:80"], &[]), 1));
        let fallback = Config::parse(br#"{"fallback":{}}"#).unwrap_or_default();
        assert!(needs_decisions(&fallback, &table(&[], &["10.0.0.2:80"]), 1), "every endpoint ejected");
        let one_in_three = table(&["10.0.0.1:80", "10.0.0.3:80"], &["10.0.0.2:80"]);
        assert!(!needs_decisions(&fallback, &one_in_three, 1), "less than half ejected: no fallback");
    }

    #[test]
    fn existing_retry_headers_are_left_alone() {
        let facts = RequestFacts { has_retry_headers: true, ..GET };
        let defaults = Config::default();
        let d = decide(&defaults, &facts, &ClusterTable::default(), 0, 100, &mut Rng::new(1), &idle);
        assert_eq!(d.retry, None);
        assert!(!d.budget_exhausted);
    }

    #[test]
    fn budget_caps_retries() {
        let defaults = Config::default();
        let d = decide(&defaults, &GET, &ClusterTable::default(), 0, 3, &mut Rng::new(1), &idle);
        assert_eq!(d.retry.map(|p| p.max_retries), Some(3));
        let defaults = Config::default();
        let d = decide(&defaults, &GET, &ClusterTable::default(), 0, 0, &mut Rng::new(1), &idle);
        assert_eq!(d.retry, None);
        assert!(d.budget_exhausted);
    }

    #[test]
    fn no_steering_while_nothing_is_wrong() {
        let t = table(&["a:1", "b:1", "c:1"], &[]);
        assert!(decide(steering(), &GET, &t, 1, 10, &mut Rng::new(1), &idle).steer.is_empty());
    }

    #[test]
    fn steering_avoids_ejected_endpoints() {
        let t = table(&["a:1", "b:1", "c:1"], &["b:1"]);
        for seed in 0..200 {
            let d = decide(steering(), &GET, &t, 1, 10, &mut Rng::new(seed), &idle);
            assert_eq!(d.steer.len(), 2);
            assert!(!d.steer.iter().any(|a| a == "b:1"), "{:?}", d.steer);
        }
    }

    #[test]
    fn steering_spreads_first_attempts() {
        let t = table(&["a:1", "b:1", "c:1", "d:1"], &["d:1"]);
        let mut firsts = std::collections::BTreeMap::new();
        let mut rng = Rng::new(7);
        for _ in 0..3_000 {
            let d = decide(steering(), &GET, &t, 1, 10, &mut rng, &idle);
            *firsts.entry(d.steer.first().cloned().unwrap_or_default()).or_insert(0) += 1;
        }
        assert_eq!(firsts.len(), 3);
        assert!(firsts.values().all(|&n| n > 800), "{firsts:?}");
    }

    #[test]
    fn list_length_follows_the_attempts() {
        let t = table(&["a:1", "b:1", "c:1", "d:1"], &["d:1"]);
        let d = decide(steering(), &GET, &t, 1, 1, &mut Rng::new(3), &idle);
        assert_eq!(d.steer.len(), 2, "one try and one retry");
    }

    #[test]
    fn endpoints_back_from_ejection_come_last() {
        let policy = Policy::from_config(&Config::default());
        let mut t = table(&["a:1", "b:1", "c:1"], &["c:1"]);
        // c's ejection has run out, but it has not answered since.
        let later = 60_000;
        t.apply(&Observation::Success("a:1"), later, &policy, 0);
        t.apply(&Observation::Success("b:1"), later, &policy, 0);
        for seed in 0..50 {
            let d = decide(steering(), &GET, &t, later, 10, &mut Rng::new(seed), &idle);
            assert_eq!(d.steer.last().map(String::as_str), Some("c:1"), "{:?}", d.steer);
        }
    }

    #[test]
    fn endpoints_that_answered_only_a_probe_come_first() {
        let policy = Policy::from_config(&Config::default());
        let mut t = table(&["a:1", "b:1", "c:1", "d:1"], &["c:1", "d:1"]);
        let later = 60_000;
        t.apply(&Observation::Success("a:1"), later, &policy, 0);
        t.apply(&Observation::ProbeAnswered("c:1"), later, &policy, 0);
        for seed in 0..50 {
            let d = decide(steering(), &GET, &t, later, 10, &mut Rng::new(seed), &idle);
            let order: Vec<&str> = d.steer.iter().map(String::as_str).collect();
            // b was never doubted; d's ejection ran out and nothing has answered for it since.
            let middle = order.get(1..3).map(|m| m.to_vec());
            assert!(matches!(middle.as_deref(), Some(["a:1", "b:1"] | ["b:1", "a:1"])), "{order:?}");
            assert_eq!((order.first(), order.last(), order.len()), (Some(&"c:1"), Some(&"d:1"), 4), "{order:?}");
        }
    }

    #[test]
    fn unproven_endpoints_keep_the_fallback_on_with_steering() {
        let policy = Policy::from_config(&Config::default());
        let with_steering = Config::parse(br#"{"endpointOverride":{},"fallback":{}}"#).unwrap_or_default();
        let without = Config::parse(br#"{"fallback":{}}"#).unwrap_or_default();
        let mut t = table(&["a:1", "b:1"], &["a:1", "b:1"]);
        let later = 60_000; // both ejections have run out
        t.apply(&Observation::Success("c:1"), later, &policy, 0);
        assert!(fallback_active(&with_steering, &t, later), "two of three have not answered since failing");
        assert!(!fallback_active(&without, &t, later), "without probes, expiry ends the fallback");
    }

    #[test]
    fn safety_valve_when_everything_is_ejected() {
        let t = table(&[], &["a:1", "b:1"]);
        assert!(decide(steering(), &GET, &t, 1, 10, &mut Rng::new(1), &idle).steer.is_empty());
    }

    #[test]
    fn explore_ratio_leaves_some_requests_to_envoy() {
        let config = Config::parse(br#"{"endpointOverride":{"exploreRatio":0.25}}"#).unwrap_or_default();
        let t = table(&["a:1", "b:1"], &["c:1"]);
        let mut rng = Rng::new(11);
        let unsteered =
            (0..4_000).filter(|_| decide(&config, &GET, &t, 1, 10, &mut rng, &idle).steer.is_empty()).count();
        assert!((800..1_200).contains(&unsteered), "{unsteered}");
        let paused = RequestFacts { exploration_paused: true, ..GET };
        assert!((0..1_000).all(|_| !decide(&config, &paused, &t, 1, 10, &mut rng, &idle).steer.is_empty()));
    }

    #[test]
    fn someone_elses_override_header_wins() {
        let t = table(&["a:1", "b:1"], &["c:1"]);
        let facts = RequestFacts { has_override_header: true, ..GET };
        assert!(decide(steering(), &facts, &t, 1, 10, &mut Rng::new(1), &idle).steer.is_empty());
    }

    #[test]
    fn attempts_go_to_the_least_loaded_endpoints_first() {
        let t = table(&["a:1", "b:1", "c:1", "d:1"], &["e:1"]);
        let busy = |a: &str| match a {
            "c:1" => 0,
            "a:1" => 1,
            _ => 3,
        };
        for seed in 0..50 {
            let d = decide(steering(), &GET, &t, 1, 10, &mut Rng::new(seed), &busy);
            assert_eq!(d.steer.get(..2), Some(&["c:1".to_string(), "a:1".to_string()][..]), "{:?}", d.steer);
            assert_eq!(d.steer.len(), 4);
        }
        // Equal loads keep the random order: no endpoint is favoured.
        let firsts: std::collections::HashSet<String> = (0..50)
            .filter_map(|seed| decide(steering(), &GET, &t, 1, 10, &mut Rng::new(seed), &idle).steer.first().cloned())
            .collect();
        assert_eq!(firsts.len(), 4, "{firsts:?}");
    }

    #[test]
    fn suspect_cluster_is_steered() {
        let mut t = table(&["a:1", "b:1"], &[]);
        t.suspect_until_ms = 100;
        assert_eq!(decide(steering(), &GET, &t, 50, 10, &mut Rng::new(1), &idle).steer.len(), 2);
        assert!(decide(steering(), &GET, &t, 100, 10, &mut Rng::new(1), &idle).steer.is_empty());
    }

    #[test]
    fn fallback_by_ejected_share_and_no_upstream() {
        let config = Config::parse(br#"{"fallback":{"ejectedShare":0.5}}"#).unwrap_or_default();
        assert!(!fallback_active(&config, &table(&["a:1", "b:1", "c:1"], &["c:1"]), 1));
        assert!(fallback_active(&config, &table(&["a:1", "b:1"], &["a:1"]), 1));
        assert!(fallback_active(&config, &table(&[], &["a:1"]), 1));
        assert!(!fallback_active(&config, &ClusterTable::default(), 1), "nothing known, nothing stale");
        let t = ClusterTable { no_upstream_until_ms: 10, ..ClusterTable::default() };
        assert!(fallback_active(&config, &t, 5));
        assert!(!fallback_active(&Config::default(), &t, 5), "not configured");
    }

    #[test]
    fn fallback_does_not_steer() {
        let config = Config::parse(br#"{"endpointOverride":{"exploreRatio":0},"fallback":{}}"#).unwrap_or_default();
        let d = decide(&config, &GET, &table(&["a:1"], &["b:1", "c:1"]), 1, 10, &mut Rng::new(1), &idle);
        assert!(d.fallback && d.steer.is_empty());
    }
}
