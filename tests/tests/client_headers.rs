//! Headers that steer routing or retries are the filter's to set, not the client's: a client
//! that names a pod in the override header, sends the fallback header or asks for its own
//! retries changes nothing, unless the configuration trusts clients (a mesh that sets them on
//! purpose).

use harness::gateway::{FallbackRoute, GatewaySpec};
use harness::upstream::{Mode, Upstream};
use harness::{client, Lab};

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const FALLBACK_HEADER: &str = "x-churn-guard-fallback";

fn spec() -> GatewaySpec {
    GatewaySpec {
        endpoint_override_header: Some(OVERRIDE_HEADER.into()),
        fallback: Some(FallbackRoute { header: FALLBACK_HEADER.into(), value: "true".into() }),
        ..GatewaySpec::default()
    }
}

fn config(trust: bool) -> String {
    // Left out when false, so that the default is what is tested.
    let trust = if trust { r#","trustClientHeaders":true"# } else { "" };
    format!(
        r#"{{"endpointOverride":{{"header":"{OVERRIDE_HEADER}"}},"fallback":{{"header":"{FALLBACK_HEADER}","value":"true"}}{trust}}}"#
    )
}

struct Outcome {
    pinned: u64,
    others: u64,
    service: u64,
    removed: u64,
}

async fn send_steering_headers(trust: bool) -> anyhow::Result<Outcome> {
    let (a, b, pinned) =
        (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, Upstream::start("pod-pinned").await?);
    let service = Upstream::start("service-clusterip").await?;
    let lab = Lab::start(spec(), Some(&config(trust)), &[a.addr, b.addr, pinned.addr], &[service.addr]).await?;
    let client = client();
    for _ in 0..60 {
        let resp = client.get(lab.url("/")).header(OVERRIDE_HEADER, pinned.addr.to_string()).send().await?;
        assert_eq!(resp.status(), 200);
    }
    let (pinned_hits, others) = (pinned.hits(), a.hits() + b.hits());
    for _ in 0..20 {
        assert_eq!(client.get(lab.url("/")).header(FALLBACK_HEADER, "true").send().await?.status(), 200);
    }
    let removed = lab.envoy.metric("client_headers_removed").await.unwrap_or(0);
    Ok(Outcome { pinned: pinned_hits, others, service: service.hits(), removed })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_pin_a_pod_or_force_the_service_path() -> anyhow::Result<()> {
    let o = send_steering_headers(false).await?;
    assert!(o.others > 0, "every request went to the pod the client named ({} of 60)", o.pinned);
    assert_eq!(o.service, 0, "a client's fallback header sent requests through the Service");
    assert_eq!(o.removed, 80, "each client-sent steering header is removed and counted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusting_configuration_keeps_them() -> anyhow::Result<()> {
    let o = send_steering_headers(true).await?;
    assert_eq!((o.pinned, o.others), (60, 0), "the trusted override header was not honoured");
    assert_eq!(o.service, 20, "the trusted fallback header was not honoured");
    assert_eq!(o.removed, 0);
    Ok(())
}

/// Upstream attempts for one GET carrying a client's `x-envoy-retry-on: 5xx` and
/// `x-envoy-max-retries: 5`, to a pod that answers 503, from a caller Envoy counts as internal
/// (so Envoy keeps its `x-envoy-*` headers), with a retry budget that allows none.
async fn attempts_with_client_retry_headers(trust: bool) -> anyhow::Result<u64> {
    let sick = Upstream::start("pod-sick").await?;
    sick.set_mode(Mode::Unavailable);
    let spec = GatewaySpec { internal_callers: true, ..GatewaySpec::default() };
    let trust = if trust { r#","trustClientHeaders":true"# } else { "" };
    let config = format!(r#"{{"retry":{{"budget":{{"ratio":0,"minRetriesPerSecond":0}}}}{trust}}}"#);
    let lab = Lab::start(spec, Some(&config), &[sick.addr], &[]).await?;
    let resp =
        client().get(lab.url("/")).header("x-envoy-retry-on", "5xx").header("x-envoy-max-retries", "5").send().await?;
    assert_eq!(resp.status(), 503);
    Ok(sick.hits())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_retry_headers_cannot_retry_past_the_budget() -> anyhow::Result<()> {
    assert_eq!(attempts_with_client_retry_headers(false).await?, 1, "the client's headers retried past a spent budget");
    Ok(())
}

/// The test above can fail: a trusting configuration leaves them to Envoy, which retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusting_configuration_leaves_a_clients_retry_headers_to_envoy() -> anyhow::Result<()> {
    assert_eq!(attempts_with_client_retry_headers(true).await?, 6, "Envoy dropped the internal caller's headers");
    Ok(())
}
