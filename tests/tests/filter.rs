//! churn-guard in real Envoy 1.40 (`--concurrency 2`) with real upstreams on 127.0.0.1, in an
//! Envoy Gateway-shaped configuration with no route retry policy.

use harness::gateway::{FallbackRoute, GatewaySpec, PRIMARY};
use harness::upstream::{refusing_addr, Mode, Upstream};
use harness::{client, eventually, fresh_connection_client, Deadline, DebugHeader, Lab};
use std::collections::HashSet;
use std::time::Duration;

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const LIMIT: Duration = Duration::from_secs(60);

async fn three_pods() -> anyhow::Result<(Upstream, Upstream, std::net::SocketAddr)> {
    Ok((Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, refusing_addr().await?))
}

fn steering_spec() -> GatewaySpec {
    GatewaySpec { endpoint_override_header: Some(OVERRIDE_HEADER.into()), ..GatewaySpec::default() }
}

/// With `{}`, a refusing endpoint costs clients nothing: GETs are retried on another endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_hide_a_refusing_endpoint_from_gets() -> anyhow::Result<()> {
    let (a, b, dead) = three_pods().await?;
    let lab = Lab::start(GatewaySpec::default(), Some("{}"), &[a.addr, b.addr, dead], &[]).await?;
    let client = client();
    let mut failed = 0;
    for _ in 0..300 {
        let resp = client.get(lab.url("/")).send().await?;
        if resp.status() != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "clients saw failed GETs");
    assert_eq!(a.hits() + b.hits(), 300);
    let retries = lab.envoy.metric("retries_performed").await?;
    assert!(retries > 0, "the dead endpoint was never picked, so nothing was shown");
    assert_eq!(lab.envoy.settled_metric("retries_added").await?, 300);
    Ok(())
}

/// Without the filter the same setup fails clients: the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_filter_a_refusing_endpoint_fails_gets() -> anyhow::Result<()> {
    let (a, b, dead) = three_pods().await?;
    let lab = Lab::start(GatewaySpec::default(), None, &[a.addr, b.addr, dead], &[]).await?;
    let client = client();
    let mut failed = 0;
    for _ in 0..60 {
        if client.get(lab.url("/")).send().await?.status() != 200 {
            failed += 1;
        }
    }
    assert!(failed > 0, "Envoy alone retried: the baseline has changed");
    Ok(())
}

/// A POST is retried when nothing reached an endpoint, and never replayed once one has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_retried_only_before_reaching_an_upstream() -> anyhow::Result<()> {
    // A refusing endpoint: POSTs are retried elsewhere and succeed.
    let (a, b, dead) = three_pods().await?;
    let lab = Lab::start(GatewaySpec::default(), Some("{}"), &[a.addr, b.addr, dead], &[]).await?;
    let client = client();
    for _ in 0..100 {
        let resp = client.post(lab.url("/orders")).body("{\"qty\":1}").send().await?;
        assert_eq!(resp.status(), 200, "a POST failed although nothing reached the dead endpoint");
    }
    assert_eq!(a.hits_for("POST") + b.hits_for("POST"), 100);
    drop(lab);

    // An endpoint that reads the request and then drops the connection: the POST reached it.
    let dropper = Upstream::start("pod-drops").await?;
    dropper.set_mode(Mode::ResetAfterRequest);
    let lab = Lab::start(GatewaySpec::default(), Some("{}"), &[dropper.addr], &[]).await?;
    let resp = client.post(lab.url("/orders")).body("{\"qty\":1}").send().await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(dropper.hits_for("POST"), 1, "the POST was replayed");
    // The same failure on a GET is retried: idempotent requests are.
    let _ = client.get(lab.url("/orders")).send().await?;
    assert!(dropper.hits_for("GET") > 1, "GETs should be retried after a reset");
    Ok(())
}

/// A pod answering 504 (its own proxy lost its backend): by default a GET is retried on another
/// pod, as 502 and 503 are (Envoy's `gateway-error`); a POST is not replayed once the pod had
/// it; and a configuration naming other codes retries those only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_retried_for_idempotent_requests_by_default() -> anyhow::Result<()> {
    let (a, b, sick) =
        (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, Upstream::start("pod-504").await?);
    sick.set_mode(Mode::GatewayTimeout);
    let pods = [a.addr, b.addr, sick.addr];
    let client = client();
    let lab = Lab::start(GatewaySpec::default(), Some("{}"), &pods, &[]).await?;
    for _ in 0..60 {
        assert_eq!(client.get(lab.url("/")).send().await?.status(), 200, "a GET got the pod's 504");
    }
    assert!(sick.hits_for("GET") > 0, "the 504 pod was never picked, so nothing was shown");
    let mut failed_posts = 0;
    for _ in 0..60 {
        if client.post(lab.url("/orders")).body("{}").send().await?.status() == 504 {
            failed_posts += 1;
        }
    }
    assert!(failed_posts > 0 && sick.hits_for("POST") == failed_posts, "a POST the pod answered was replayed");
    drop(lab);

    let lab =
        Lab::start(GatewaySpec::default(), Some(r#"{"retry":{"retriableStatusCodes":[502,503]}}"#), &pods, &[]).await?;
    let mut failed = 0;
    for _ in 0..60 {
        if client.get(lab.url("/")).send().await?.status() == 504 {
            failed += 1;
        }
    }
    assert!(failed > 0, "504 was retried although the configuration names 502 and 503 only");
    Ok(())
}

/// Sends requests on fresh connections until every Envoy worker's VM reports `addr` ejected in
/// the debug header (shared data at work), or `LIMIT` passes.
async fn ejected_on_every_worker(lab: &Lab, addr: &str) -> anyhow::Result<bool> {
    let client = fresh_connection_client();
    let mut vms_seeing_it = HashSet::new();
    let deadline = Deadline::after(LIMIT);
    while vms_seeing_it.len() < 2 && !deadline.passed() {
        if let Ok(resp) = client.get(lab.url("/")).send().await {
            if let Some(h) = DebugHeader::of(&resp) {
                if h.ejected.iter().any(|e| e == addr) {
                    vms_seeing_it.insert(h.vm);
                }
            }
        }
    }
    Ok(vms_seeing_it.len() >= 2)
}

fn ejections_logged(log: &str, addr: &str) -> Vec<u64> {
    let needle = format!("ejected {addr} of cluster {PRIMARY} for ");
    log.lines()
        .filter_map(|l| l.split_once(&needle))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A refusing endpoint is ejected in the table all workers share, stays out for its ejection
/// time, is ejected for twice as long each time it fails again, and returns once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_endpoint_is_ejected_on_every_worker_backs_off_and_returns() -> anyhow::Result<()> {
    let (a, b) = (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?);
    let mut c = Upstream::start("pod-c").await?;
    let config = r#"{"debugHeader":true,"endpointOverride":{"exploreRatio":0},
                    "ejection":{"baseEjectionMs":1000,"maxEjectionMs":8000}}"#;
    let lab = Lab::start(steering_spec(), Some(config), &[a.addr, b.addr, c.addr], &[]).await?;
    let client = fresh_connection_client();
    for _ in 0..30 {
        assert_eq!(client.get(lab.url("/")).send().await?.status(), 200);
    }
    assert!(c.hits() > 0, "pod-c should have been in rotation");

    c.kill().await;
    let dead = c.addr.to_string();
    assert!(ejected_on_every_worker(&lab, &dead).await?, "pod-c was not seen ejected by two workers");

    // Keep it dead and keep traffic flowing: each ejection doubles, up to the maximum.
    let mut failed = 0;
    let deadline = Deadline::after(LIMIT);
    while ejections_logged(&lab.envoy.log(), &dead).len() < 4 && !deadline.passed() {
        if !matches!(client.get(lab.url("/")).send().await, Ok(r) if r.status() == 200) {
            failed += 1;
        }
    }
    let durations = ejections_logged(&lab.envoy.log(), &dead);
    assert_eq!(durations.get(..4), Some(&[1000, 2000, 4000, 8000][..]), "{durations:?}");
    assert_eq!(failed, 0, "clients saw failures while pod-c was dead");

    // Back on the same address: once its ejection ends it gets traffic again.
    c.restart().await?;
    let before = c.hits();
    let returned = eventually(LIMIT, || {
        let req = client.get(lab.url("/")).send();
        let c = &c;
        async move {
            let _ = req.await;
            c.hits() > before
        }
    })
    .await;
    assert!(returned, "pod-c never got traffic again");
    let resp = client.get(lab.url("/")).send().await?;
    let header = DebugHeader::of(&resp).unwrap_or_default();
    assert!(!header.ejected.contains(&c.addr.to_string()), "{header:?}");
    assert!(lab.envoy.metric("ejections").await? >= 4);
    Ok(())
}

/// With the `override_host` cluster that `endpointOverride` generates, once an endpoint is
/// ejected no request reaches it: not first tries, not retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steered_requests_never_reach_an_ejected_endpoint() -> anyhow::Result<()> {
    let (a, b, sick) =
        (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, Upstream::start("pod-sick").await?);
    let config = r#"{"debugHeader":true,"endpointOverride":{"exploreRatio":0},"ejection":{"baseEjectionMs":120000}}"#;
    let lab = Lab::start(steering_spec(), Some(config), &[a.addr, b.addr, sick.addr], &[]).await?;
    let keepalive = client();
    let fresh = fresh_connection_client();
    for _ in 0..30 {
        assert_eq!(fresh.get(lab.url("/")).send().await?.status(), 200);
    }
    assert!(sick.hits() > 0);

    // The pod starts failing with 503s, as one being shut down does.
    sick.set_mode(Mode::Unavailable);
    assert!(ejected_on_every_worker(&lab, &sick.addr.to_string()).await?, "pod-sick was never ejected everywhere");
    let hits_at_ejection = sick.hits();
    let served_before = a.hits() + b.hits();
    for i in 0..300 {
        let client = if i % 2 == 0 { &keepalive } else { &fresh };
        let resp = client.get(lab.url("/")).send().await?;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(sick.hits(), hits_at_ejection, "requests reached the ejected endpoint");
    assert_eq!(a.hits() + b.hits() - served_before, 300, "every request was served once, without retries");
    assert!(lab.envoy.metric("steered").await? >= 300);
    assert!(
        eventually(LIMIT, || async { lab.envoy.metric("ejected_endpoints").await.unwrap_or(0) == 1 }).await,
        "the ejected-endpoints gauge never showed the ejection"
    );
    Ok(())
}

fn fallback_spec() -> GatewaySpec {
    GatewaySpec {
        fallback: Some(FallbackRoute { header: "x-churn-guard-fallback".into(), value: "true".into() }),
        ..GatewaySpec::default()
    }
}

/// Every endpoint in EDS is gone (the control plane is late): requests go to the Service-routed
/// fallback rule and succeed; when the endpoints are back, traffic returns to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_serves_while_every_endpoint_is_dead_and_stops_on_recovery() -> anyhow::Result<()> {
    let dead = [refusing_addr().await?, refusing_addr().await?, refusing_addr().await?];
    let service = Upstream::start("service-clusterip").await?;
    let config = r#"{"debugHeader":true,"fallback":{},"ejection":{"baseEjectionMs":1000,"maxEjectionMs":1000}}"#;
    let lab = Lab::start(fallback_spec(), Some(config), &dead, &[service.addr]).await?;
    let client = client();

    // The filter has to see the endpoints fail before it knows the set is stale.
    let mut warmup = 0;
    while client.get(lab.url("/")).send().await?.status() != 200 {
        warmup += 1;
        assert!(warmup < 10, "still failing after {warmup} requests");
    }
    let served_before = service.hits();
    for _ in 0..100 {
        let resp = client.get(lab.url("/")).send().await?;
        assert_eq!(resp.status(), 200);
        assert!(DebugHeader::of(&resp).is_some_and(|h| h.fallback), "served by the primary cluster?");
    }
    assert_eq!(service.hits() - served_before, 100);
    assert!(lab.envoy.metric("fallbacks").await? >= 100);

    // The pods are back where EDS says they are.
    let pods = [
        Upstream::start_on("pod-a", dead[0]).await?,
        Upstream::start_on("pod-b", dead[1]).await?,
        Upstream::start_on("pod-c", dead[2]).await?,
    ];
    let recovered = eventually(LIMIT, || {
        let req = client.get(lab.url("/")).send();
        async move { matches!(req.await, Ok(r) if DebugHeader::of(&r).is_some_and(|h| !h.fallback)) }
    })
    .await;
    assert!(recovered, "traffic never returned to the endpoints");
    let service_before = service.hits();
    for _ in 0..50 {
        assert_eq!(client.get(lab.url("/")).send().await?.status(), 200);
    }
    assert_eq!(service.hits(), service_before, "still falling back after recovery");
    assert!(pods.iter().map(Upstream::hits).sum::<u64>() >= 50, "the pods did not serve the traffic");
    Ok(())
}

/// An endpoint set that is empty (Envoy answers "no healthy upstream") is stale too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_serves_while_the_endpoint_set_is_empty() -> anyhow::Result<()> {
    let service = Upstream::start("service-clusterip").await?;
    let lab =
        Lab::start(fallback_spec(), Some(r#"{"fallback":{"consecutiveNoUpstream":2}}"#), &[], &[service.addr]).await?;
    let client = client();
    for _ in 0..2 {
        assert_eq!(client.get(lab.url("/")).send().await?.status(), 503);
    }
    // Envoy runs the filter's on_log after the response has gone out: wait until it has.
    let recorded =
        eventually(LIMIT, || async { lab.envoy.metric("no_healthy_upstream").await.unwrap_or(0) == 2 }).await;
    assert!(recorded, "the filter did not record the empty endpoint set");
    // A worker whose copy of the shared table is younger than its 100 ms refresh may not know yet.
    let switched = eventually(LIMIT, || async {
        client.get(lab.url("/")).send().await.map(|r| r.status() == 200).unwrap_or(false)
    })
    .await;
    assert!(switched, "requests never fell back");
    let before = service.hits();
    for _ in 0..50 {
        let resp = client.get(lab.url("/")).send().await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}\n{}", lab.envoy.log_tail(30));
    }
    assert_eq!(service.hits(), before + 50);
    Ok(())
}

/// Every metric the filter defines is in Envoy's `/stats`, and failures are counted by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_appear_in_envoy_stats() -> anyhow::Result<()> {
    let (a, dead) = (Upstream::start("pod-a").await?, refusing_addr().await?);
    // No retries: every failure reaches the client and is classified.
    let lab = Lab::start(GatewaySpec::default(), Some(r#"{"retry":{"enabled":false}}"#), &[a.addr, dead], &[]).await?;
    let client = client();
    for _ in 0..40 {
        let _ = client.get(lab.url("/")).send().await?;
    }
    let stats = lab.envoy.stats().await?;
    for name in [
        "ejections",
        "retries_added",
        "retries_denied_budget",
        "retries_performed",
        "steered",
        "fallbacks",
        "no_healthy_upstream",
        "failures.connect_failure",
        "failures.reset",
        "failures.timeout",
        "failures.gateway_error",
        "failures.server_error",
        "ejected_endpoints",
        "known_endpoints",
    ] {
        assert!(stats.contains_key(&format!("wasmcustom.churn_guard.{name}")), "missing {name}");
    }
    assert!(lab.envoy.metric("failures.connect_failure").await? >= 1);
    assert!(lab.envoy.metric("ejections").await? >= 1);
    assert_eq!(lab.envoy.settled_metric("retries_added").await?, 0);
    Ok(())
}

/// A bad plugin configuration is refused when Envoy receives it: the listener update is rejected
/// with a log line naming the field, and Envoy keeps serving with the configuration it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_rejected_and_envoy_stays_up() -> anyhow::Result<()> {
    let a = Upstream::start("pod-a").await?;
    let mut lab = Lab::start(GatewaySpec::default(), Some("{}"), &[a.addr], &[]).await?;
    let client = client();
    assert_eq!(client.get(lab.url("/")).send().await?.status(), 200);

    let bad = [
        (r#"{"retry":{"maxRetries":"ten"}}"#, "retry.maxRetries"),
        (r#"{"ejection":{"baseEjectionSeconds":5}}"#, "ejection.baseEjectionSeconds"),
        (r#"{"fallback":{"ejectedShare":2}}"#, "fallback.ejectedShare"),
    ];
    for (config, field) in bad {
        let rejected_before = lab.envoy.stat("listener_manager.lds.update_rejected").await.unwrap_or(0);
        let mut spec = lab.spec.clone();
        if let Some(f) = spec.filter.as_mut() {
            f.config = config.to_string();
        }
        lab.xds.write_gateway(&spec)?;
        let named = format!("invalid churn-guard configuration: field `{field}`");
        let rejected = eventually(LIMIT, || async {
            lab.envoy.log().contains(&named)
                && lab.envoy.stat("listener_manager.lds.update_rejected").await.unwrap_or(0) > rejected_before
        })
        .await;
        assert!(rejected, "no rejection naming {field}:\n{}", lab.envoy.log_tail(20));
        assert!(lab.envoy.is_running());
        assert_eq!(client.get(lab.url("/")).send().await?.status(), 200, "Envoy stopped serving");
    }
    Ok(())
}
