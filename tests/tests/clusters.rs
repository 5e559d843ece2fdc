//! One gateway routes to many clusters: what the filter learns and spends is per cluster.

use harness::gateway::{FallbackRoute, GatewaySpec, PRIMARY};
use harness::upstream::{refusing_addr, Mode, Upstream};
use harness::{eventually, fresh_connection_client, Lab};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A cluster whose every endpoint refuses keeps draining its retry budget; requests to a healthy
/// cluster in between keep getting retries, so a pod there that sheds load costs clients nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cluster_does_not_spend_a_healthy_clusters_retries() -> anyhow::Result<()> {
    let (a, b) = (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?);
    let broken = [refusing_addr().await?, refusing_addr().await?, refusing_addr().await?];
    // A second route rule, matched by a header, sends requests to a second cluster; the filter
    // knows nothing of it but its name.
    let spec = GatewaySpec {
        fallback: Some(FallbackRoute { header: "x-route".into(), value: "broken".into() }),
        ..GatewaySpec::default()
    };
    // A retry for every five requests, over a floor of 60 per minute: enough for a cluster where
    // one request in four needs a retry, not for one where every request wants ten.
    let config = r#"{"retry":{"budget":{"ratio":0.2,"minRetriesPerSecond":1,"windowSeconds":60}}}"#;
    let lab = Lab::start(spec, Some(config), &[a.addr, b.addr], &broken).await?;
    let client = fresh_connection_client();
    let broken_request = || async {
        let resp = client.get(lab.url("/")).header("x-route", "broken").send().await?;
        assert_eq!(resp.status(), 503);
        anyhow::Ok(())
    };

    for _ in 0..40 {
        broken_request().await?;
    }
    let drained =
        eventually(LIMIT, || async { lab.envoy.metric("retries_denied_budget").await.unwrap_or(0) > 0 }).await;
    assert!(drained, "the broken cluster never ran out of retries; the case was not exercised");

    a.set_mode(Mode::UnavailableEveryOther);
    let mut failed = 0;
    for _ in 0..40 {
        broken_request().await?;
        if client.get(lab.url("/")).send().await?.status() != 200 {
            failed += 1;
        }
    }
    assert!(a.unavailable_answers() > 0, "pod-a never shed a request");
    assert_eq!(failed, 0, "requests to the healthy cluster went without retries");
    Ok(())
}

/// A cluster nobody routes to for the endpoint TTL leaves shared data; when traffic comes back,
/// its state is learnt again from scratch and works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_unused_for_the_ttl_is_forgotten_and_relearnt() -> anyhow::Result<()> {
    let a = Upstream::start("pod-a").await?;
    let dead = refusing_addr().await?;
    // No retries, so that the refusing endpoint's failures reach the filter undisguised.
    let config = r#"{"retry":{"enabled":false},
                    "ejection":{"endpointTtlMs":1000,"baseEjectionMs":500,"maxEjectionMs":500}}"#;
    let lab = Lab::start(GatewaySpec::default(), Some(config), &[a.addr, dead], &[]).await?;
    let client = fresh_connection_client();
    let ejections = |log: &str| log.matches(&format!("ejected {dead} of cluster {PRIMARY}")).count();

    let ejected = eventually(LIMIT, || async {
        let _ = client.get(lab.url("/")).send().await;
        ejections(&lab.envoy.log()) > 0
    })
    .await;
    assert!(ejected, "the refusing endpoint was never ejected");

    let expired = format!("cluster {PRIMARY} expired");
    let forgotten = eventually(LIMIT, || async { lab.envoy.log().contains(&expired) }).await;
    assert!(forgotten, "the unused cluster's state was never removed:\n{}", lab.envoy.log_tail(20));

    let before = ejections(&lab.envoy.log());
    let relearnt = eventually(LIMIT, || async {
        let _ = client.get(lab.url("/")).send().await;
        ejections(&lab.envoy.log()) > before
    })
    .await;
    assert!(relearnt, "after expiry the cluster's state was not learnt again");
    Ok(())
}
