//! A shortened S1 (few pods, short control-plane lag) in the test suite: the rolling restart
//! hurts plain Envoy Gateway, and churn-guard fails fewer requests. No timing assertions.

use churn_lab::pods::{RolloutSpec, Termination};
use churn_lab::report::summarize;
use churn_lab::scenario::{run, Load, Scenario};
use churn_lab::variants::Variant;
use std::time::Duration;

fn short_s1() -> Scenario {
    Scenario {
        name: "S1-short".into(),
        replicas: 8,
        termination: Termination::Graceful,
        rollout: Some(RolloutSpec {
            replicas: 8,
            max_surge: 0.25,
            max_unavailable: 0.25,
            readiness_delay: Duration::from_secs(1),
            termination: Termination::Graceful,
        }),
        lag: Duration::from_secs(4),
        batch: Duration::from_secs(1),
        load: Load::Open { rate: 100 },
        warmup: Duration::from_secs(3),
        settle: Duration::from_secs(1),
        steady_for: Duration::ZERO,
        per_try_timeout: None,
        connect_timeout: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_guard_fails_fewer_requests_than_plain_during_a_rolling_restart() -> anyhow::Result<()> {
    let scenario = short_s1();
    let quiet = |_: &str| {};
    let plain = summarize(&run(&scenario, Variant::Plain, &quiet).await?);
    let guarded = summarize(&run(&scenario, Variant::ChurnGuardFallback, &quiet).await?);
    eprintln!(
        "plain: {} of {} failed; churn-guard: {} of {} failed",
        plain.failed, plain.sent, guarded.failed, guarded.sent
    );
    assert!(plain.sent > 500 && guarded.sent > 500, "too little load to say anything");
    assert!(plain.failed > 0, "the rollout did not hurt plain Envoy: the lab no longer reproduces the outage");
    assert!(guarded.failed < plain.failed, "churn-guard failed {} requests, plain {}", guarded.failed, plain.failed);
    Ok(())
}
