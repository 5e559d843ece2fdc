//! The lab's Service path must be no kinder than kube-proxy: it learns endpoint changes late and
//! sends each connection to one pod, with no second try inside the Service.

use churn_lab::pods::Endpoints;
use churn_lab::service::ServiceProxy;
use harness::upstream::{refusing_addr, Upstream};
use std::sync::{Arc, RwLock};
use std::time::Duration;

async fn get(client: &reqwest::Client, proxy: &ServiceProxy) -> bool {
    client.get(format!("http://{}/", proxy.addr)).send().await.is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_dead_pod_fails_and_changes_arrive_late() -> anyhow::Result<()> {
    let (a, b) = (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?);
    let dead = refusing_addr().await?;
    let truth: Endpoints = Arc::new(RwLock::new(vec![a.addr, dead]));
    let proxy = ServiceProxy::start(Arc::clone(&truth), Duration::from_secs(2)).await?;
    // A request that never ends is a failed one to a client, not a test that waits forever (one
    // run hung here with no connection open).
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build()?;

    let mut failed = 0;
    for _ in 0..40 {
        if !get(&client, &proxy).await {
            failed += 1;
        }
    }
    assert!(failed > 0, "every connection succeeded although one of two pods refuses");
    assert!(failed < 40 && a.hits() > 0, "the live pod was never used");

    // The EndpointSlice now says pod-b only; the Service goes on with what it knew for a while.
    *truth.write().map_err(|_| anyhow::anyhow!("poisoned"))? = vec![b.addr];
    for _ in 0..10 {
        get(&client, &proxy).await;
    }
    assert_eq!(b.hits(), 0, "the change arrived at once");
    let arrived =
        harness::eventually(Duration::from_secs(30), || async { get(&client, &proxy).await && b.hits() > 0 }).await;
    assert!(arrived, "the change never arrived");
    let before = a.hits();
    for _ in 0..20 {
        assert!(get(&client, &proxy).await);
    }
    assert_eq!(a.hits(), before, "connections still went to the old pod");
    Ok(())
}
