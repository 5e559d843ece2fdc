//! A `ClusterTable` driven through an arbitrary sequence of observations and clock moves under
//! an arbitrary (valid) policy. Invariants after every step:
//! - never more endpoints than `maxEndpointsPerCluster`, sorted and unique by address;
//! - `decode(encode(t)) == t`;
//! - an ejection lasts `policy.ejection_ms(level)`, at most `maxEjectionMs`, and the endpoint
//!   is back (not ejected) once it has run out;
//! - `would_change` false means `apply` reports no change (the hot path skips the write);
//! - the counts are consistent, and backoff levels stay bounded.
#![no_main]

use arbitrary::Arbitrary;
use churn_guard::config::Config;
use churn_guard::health::{ClusterTable, Observation, Policy};
use churn_guard::outcome::FailureKind;
use libfuzzer_sys::fuzz_target;

const ADDRESSES: [&str; 12] = [
    "10.0.0.1:8080",
    "10.0.0.2:8080",
    "10.0.0.3:8080",
    "10.0.0.4:8080",
    "10.0.0.5:8080",
    "10.0.0.6:8080",
    "[fd00::1]:8080",
    "[fd00::2]:8080",
    "192.168.1.1:80",
    "192.168.1.2:80",
    "127.0.0.1:9000",
    "1.1.1.1:443",
];

#[derive(Arbitrary, Debug)]
struct PolicyInput {
    local_origin: u8,
    gateway: u8,
    five_xx: u8,
    base_ms: u16,
    extra_max_ms: u32,
    max_endpoints: u8,
    ttl_ms: u32,
    no_upstream: u8,
    suspect_ms: u32,
}

#[derive(Arbitrary, Debug)]
enum Kind {
    ConnectFailure,
    Reset,
    Timeout,
    GatewayError,
    ServerError,
    RetriedAttempt,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Success(u8),
    Failure(u8, Kind),
    NoUpstream,
    Unattributed,
    Absent(u8),
    Suspect(u8),
    ProbeAnswered(u8),
    /// Time passes.
    Advance(u32),
    /// Another worker's clock, slightly behind.
    Rewind(u16),
    /// Jump to when an endpoint's ejection runs out.
    UntilBack(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    policy: PolicyInput,
    start_ms: u32,
    ops: Vec<Op>,
}

fn policy(p: &PolicyInput) -> Policy {
    let mut config = Config::default();
    let e = &mut config.ejection;
    e.consecutive_local_origin_failures = u32::from(p.local_origin % 6);
    e.consecutive_gateway_errors = u32::from(p.gateway % 6);
    e.consecutive_5xx = u32::from(p.five_xx % 6);
    e.base_ejection_ms = u64::from(p.base_ms).max(1);
    e.max_ejection_ms = e.base_ejection_ms + u64::from(p.extra_max_ms % 1_000_000);
    e.max_endpoints_per_cluster = u32::from(p.max_endpoints % 10).max(1);
    e.endpoint_ttl_ms = 1_000 + u64::from(p.ttl_ms % 1_000_000);
    let mut policy = Policy::from_config(&config);
    policy.consecutive_no_upstream = u32::from(p.no_upstream % 5);
    policy
}

fn kind(k: &Kind) -> FailureKind {
    match k {
        Kind::ConnectFailure => FailureKind::ConnectFailure,
        Kind::Reset => FailureKind::Reset,
        Kind::Timeout => FailureKind::Timeout,
        Kind::GatewayError => FailureKind::GatewayError,
        Kind::ServerError => FailureKind::ServerError,
        Kind::RetriedAttempt => FailureKind::RetriedAttempt,
    }
}

fn address(i: u8) -> &'static str {
    ADDRESSES[usize::from(i) % ADDRESSES.len()]
}

fuzz_target!(|input: Input| {
    let policy = policy(&input.policy);
    let suspect_ms = u64::from(input.policy.suspect_ms % 100_000);
    let cap = policy.ejection.max_endpoints_per_cluster as usize;
    let ttl = policy.ejection.endpoint_ttl_ms;
    let mut now = u64::from(input.start_ms);
    let mut t = ClusterTable::default();
    for op in input.ops.iter().take(256) {
        let obs = match op {
            Op::Success(a) => Observation::Success(address(*a)),
            Op::Failure(a, k) => Observation::Failure(address(*a), kind(k)),
            Op::NoUpstream => Observation::NoUpstream,
            Op::Unattributed => Observation::Unattributed,
            Op::Absent(a) => Observation::Absent(address(*a)),
            Op::Suspect(a) => Observation::Suspect(address(*a)),
            Op::ProbeAnswered(a) => Observation::ProbeAnswered(address(*a)),
            Op::Advance(ms) => {
                now = now.saturating_add(u64::from(*ms));
                continue;
            }
            Op::Rewind(ms) => {
                now = now.saturating_sub(u64::from(*ms));
                continue;
            }
            Op::UntilBack(a) => {
                if let Some(e) = t.find(address(*a)) {
                    if e.is_ejected(now) {
                        now = e.ejected_until_ms;
                        assert!(!t.is_ejected(address(*a), now), "back once the ejection runs out");
                    }
                }
                continue;
            }
        };
        let before = t.clone();
        let level_before = match obs {
            Observation::Failure(a, _) => t.find(a).map_or(0, |e| e.level),
            _ => 0,
        };
        let would = t.would_change(&obs, now);
        let applied = t.apply(&obs, now, &policy, suspect_ms);
        if !would {
            assert!(!applied.changed, "would_change said no, apply changed {before:?} -> {t:?} for {obs:?}");
        }
        if !applied.changed {
            assert_eq!(t.last_write_ms, before.last_write_ms);
        } else {
            assert_eq!(t.last_write_ms, now);
        }
        for (addr, duration) in &applied.ejected {
            assert!(matches!(obs, Observation::Failure(a, _) if a == addr));
            assert_eq!(*duration, policy.ejection_ms(level_before));
            assert!(*duration >= 1 && *duration <= policy.ejection.max_ejection_ms);
            let e = t.find(addr).unwrap_or_else(|| panic!("{addr} ejected and forgotten"));
            assert_eq!(e.ejected_until_ms, now.saturating_add(*duration));
            if now < u64::MAX {
                assert!(t.is_ejected(addr, now));
            }
            assert!(!t.is_ejected(addr, now.saturating_add(*duration)) || now.saturating_add(*duration) == u64::MAX);
            assert!(!e.proven);
        }
        if let Observation::Success(a) = obs {
            let e = t.find(a).unwrap_or_else(|| panic!("{a} answered and is not in the table"));
            assert!(e.proven && e.consecutive_local_origin == 0 && e.consecutive_gateway == 0);
            assert_eq!(t.consecutive_no_upstream, 0);
        }
        if let Observation::Failure(a, _) = obs {
            assert!(t.find(a).is_some_and(|e| !e.proven), "{a} failed and is not in the table as unproven");
        }

        assert!(t.endpoints.len() <= cap, "{} endpoints, cap {cap}", t.endpoints.len());
        assert!(t.endpoints.windows(2).all(|w| w[0].address < w[1].address), "sorted and unique");
        assert!(t.endpoints.iter().all(|e| e.level <= 63));
        if let Observation::Absent(a) = obs {
            assert!(t.find(a).is_none(), "{a} is absent and still in the table");
        }
        // Endpoints still ejected are not forgotten by an update, unless they left the cluster.
        if applied.changed {
            let absent = |addr: &str| matches!(obs, Observation::Absent(a) if a == addr);
            for e in before.endpoints.iter().filter(|e| e.is_ejected(now) && !absent(&e.address)) {
                let evicted_for_space = before.endpoints.len() >= cap;
                assert!(t.find(&e.address).is_some() || evicted_for_space, "{} forgotten while ejected", e.address);
            }
        }
        let tally = t.tally(now, ttl);
        assert!(tally.ejected <= tally.unhealthy && tally.unhealthy <= tally.known && tally.known <= t.endpoints.len());
        assert_eq!(t.counts(now, ttl), (tally.ejected, tally.known));
        let c = t.candidates(now, ttl);
        assert_eq!(t.has_trouble(now, ttl), tally.unhealthy > 0 || !c.probe_answered.is_empty());
        assert_eq!(c.proven.len() + c.probe_answered.len() + c.unproven.len() + tally.ejected, tally.known);
        assert_eq!(t.unproven_addresses(now, ttl), c.unproven);
        assert!(t.ejected_addresses(now).count() >= tally.ejected);

        let encoded = t.encode();
        assert_eq!(ClusterTable::decode(&encoded), t, "decode(encode(t)) == t");
    }
});
