//! The main job: the filter delivered by registry-cache, and a rolling restart behind real
//! Envoy without and with it.

use crate::delivery::{self, Delivery};
use crate::gateway_examples::GatewayExamples;
use crate::pods::{Protocol, RolloutSpec, Termination};
use crate::scenario::{self, Load, RunResult, Scenario};
use crate::variants::Variant;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub pods: usize,
    /// How late the control plane tells Envoy about endpoint changes.
    pub lag: Duration,
    pub rate: u32,
}

pub struct DemoOutcome {
    pub delivery: Delivery,
    /// Without the filter, then with it.
    pub results: Vec<RunResult>,
    /// How many times Envoy fetched the module from the cache.
    pub modules_served: u64,
}

pub fn scenario(options: &DemoOptions) -> Scenario {
    Scenario {
        name: "demo".into(),
        replicas: options.pods,
        termination: Termination::Graceful,
        rollout: Some(RolloutSpec {
            replicas: options.pods,
            max_surge: 0.25,
            max_unavailable: 0.25,
            readiness_delay: Duration::from_secs(2),
            termination: Termination::Graceful,
        }),
        lag: options.lag,
        batch: Duration::from_secs(1),
        load: Load::Open { rate: options.rate },
        warmup: Duration::from_secs(5),
        settle: Duration::from_secs(3),
        steady_for: Duration::ZERO,
        per_try_timeout: None,
        connect_timeout: None,
        tuned_timeouts: None,
        protocol: Protocol::Http,
    }
}

pub async fn run(options: &DemoOptions, say: &(dyn Fn(&str) + Sync)) -> anyhow::Result<DemoOutcome> {
    let examples = GatewayExamples::load(&harness::envoy::workspace_root().join("examples/envoy-gateway"))?;
    let module = harness::wasm_module()?;
    say("1. delivering the filter through registry-cache");
    let delivery = delivery::deliver(&module, &examples, say).await?;
    anyhow::ensure!(
        delivery.module_sha256 == harness::sha256_hex(&module),
        "the cache rendered sha256 {} for a module whose sha256 is {}",
        delivery.module_sha256,
        harness::sha256_hex(&module)
    );
    let scenario = scenario(options);
    say(&format!(
        "2. rolling restart of {} pods (25% surge, 25% unavailable), control plane {}s late, {} requests/s",
        options.pods,
        options.lag.as_secs(),
        options.rate
    ));
    say("== without the filter: Envoy Gateway's defaults");
    let plain = scenario::run(&scenario, Variant::Plain, say).await?;
    say("== with churn-guard, loaded from registry-cache as the example policies configure it");
    let guarded = scenario::run_with(&scenario, Variant::ChurnGuardFallback, Some(&delivery.configured), say).await?;
    let modules_served = delivery.modules_served().await?;
    Ok(DemoOutcome { delivery, results: vec![plain, guarded], modules_served })
}
