//! `Config::parse` on arbitrary bytes: never panics, and whatever it accepts satisfies the
//! validated ranges, parses the same way twice, and yields a health policy whose ejections stay
//! within bounds.
#![no_main]

use churn_guard::config::Config;
use churn_guard::health::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(data) else { return };
    assert_eq!(Config::parse(data).ok().as_ref(), Some(&config), "parsing is deterministic");

    let e = &config.ejection;
    assert!(e.base_ejection_ms >= 1 && e.max_ejection_ms >= e.base_ejection_ms);
    assert!((1..=65_536).contains(&e.max_endpoints_per_cluster));
    assert!(e.endpoint_ttl_ms >= 1_000);
    let r = &config.retry;
    assert!(r.max_retries <= 25);
    assert!(r.retriable_status_codes.iter().all(|c| (500..=599).contains(c)));
    assert!(r.budget.ratio.is_finite() && (0.0..=10.0).contains(&r.budget.ratio));
    assert!((1..=3_600).contains(&r.budget.window_seconds));
    // What Envoy retries is the configured codes, no more: `gateway-error` (502, 503, 504) only
    // when all three are configured, the header for the rest.
    let mut retried: Vec<u16> = match &r.status_codes_header {
        None => Vec::new(),
        Some(h) => h.split(',').filter_map(|c| c.parse().ok()).collect(),
    };
    let conditions: Vec<&str> = r.idempotent_retry_on.split(',').collect();
    if conditions.contains(&"gateway-error") {
        retried.extend([502, 503, 504]);
    }
    assert_eq!(conditions.contains(&"retriable-status-codes"), r.status_codes_header.is_some());
    let mut configured = r.retriable_status_codes.clone();
    retried.sort_unstable();
    retried.dedup();
    configured.sort_unstable();
    configured.dedup();
    assert_eq!(retried, configured);
    if let Some(o) = &config.endpoint_override {
        assert!(!o.header.is_empty() && (0.0..=1.0).contains(&o.explore_ratio));
    }
    if let Some(f) = &config.fallback {
        assert!(!f.header.is_empty() && !f.value.is_empty());
        assert!(f.ejected_share > 0.0 && f.ejected_share <= 1.0);
    }

    let policy = Policy::from_config(&config);
    let mut last = 0;
    for level in 0..=u8::MAX {
        let ms = policy.ejection_ms(level);
        assert!(ms >= e.base_ejection_ms.min(e.max_ejection_ms) && ms <= e.max_ejection_ms);
        assert!(ms >= last, "backoff never shrinks with the level");
        last = ms;
    }
});
