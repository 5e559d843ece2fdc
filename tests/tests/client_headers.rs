//! Headers that steer routing are the filter's to set, not the client's: a client that names a
//! pod in the override header, or sends the fallback header, changes nothing, unless the
//! configuration trusts clients (a mesh that sets them on purpose).

use harness::gateway::{FallbackRoute, GatewaySpec};
use harness::upstream::Upstream;
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
