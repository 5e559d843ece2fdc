//! `ClusterTable::decode` of arbitrary shared-data bytes (another plugin version, corruption):
//! never panics, and the decoded table is usable: every query and an update on it work, and
//! it re-encodes to something that decodes to itself.
#![no_main]

use churn_guard::config::Config;
use churn_guard::health::{ClusterTable, Observation, Policy};
use churn_guard::outcome::FailureKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut t = ClusterTable::decode(data);
    assert_eq!(ClusterTable::decode(&t.encode()), t);
    let now = t.endpoints.first().map_or(0, |e| e.last_seen_ms);
    let ttl = 600_000;
    let tally = t.tally(now, ttl);
    assert!(tally.ejected <= tally.unhealthy && tally.unhealthy <= tally.known && tally.known <= t.endpoints.len());
    let _ = t.candidates(now, ttl);
    let _ = t.unproven_addresses(now, ttl);
    let _ = t.ejected_addresses(now).count();
    let _ = t.has_trouble(now, ttl);
    let policy = Policy::from_config(&Config::default());
    let addresses: Vec<String> = t.endpoints.iter().map(|e| e.address.clone()).take(4).collect();
    for a in &addresses {
        let _ = t.would_change(&Observation::Success(a), now);
        t.apply(&Observation::Failure(a, FailureKind::ConnectFailure), now, &policy, 1_000);
        t.apply(&Observation::Success(a), now.saturating_add(1), &policy, 1_000);
        let _ = t.find(a);
    }
    t.apply(&Observation::NoUpstream, now, &policy, 1_000);
    t.apply(&Observation::Unattributed, u64::MAX, &policy, u64::MAX);
    assert_eq!(ClusterTable::decode(&t.encode()), t);
});
