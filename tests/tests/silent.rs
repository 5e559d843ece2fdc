//! A pod that stops answering without failing anything: its address vanished (packets
//! dropped, no reset) or its process froze. Envoy learns of it only when a connect or per-try
//! timeout fires, seconds later, and Envoy Gateway sets no per-try timeout by default. Until
//! then every request sent there waits. The filter must notice from time alone and send new
//! requests elsewhere.

use harness::gateway::GatewaySpec;
use harness::upstream::{Mode, Upstream};
use harness::{client, eventually, Lab};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const LIMIT: Duration = Duration::from_secs(60);

/// Three pods; one goes silent under steady traffic. The filter doubts it after a request
/// there waits past `stallAfterMs`, and from then on no client request is sent there: steered
/// lists put it last, behind two pods that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_stops_answering_gets_no_new_requests_long_before_any_timeout() -> anyhow::Result<()> {
    let a = Upstream::start("pod-a").await?;
    let b = Upstream::start("pod-b").await?;
    let silent = Upstream::start("pod-silent").await?;
    let config = r#"{"endpointOverride":{"exploreRatio":0}}"#;
    let spec = GatewaySpec { endpoint_override_header: Some(OVERRIDE_HEADER.into()), ..GatewaySpec::default() };
    let lab = Lab::start(spec, Some(config), &[a.addr, b.addr, silent.addr], &[]).await?;
    let client = client();

    let learnt = eventually(LIMIT, || async {
        let _ = client.get(lab.url("/")).send().await;
        a.hits() > 0 && b.hits() > 0 && silent.hits() > 0
    })
    .await;
    assert!(learnt, "requests never reached all three pods");

    silent.set_mode(Mode::Silent);
    // Open-loop traffic: requests that land on the silent pod wait (up to the client's 30 s)
    // without holding the others back.
    let phase = Arc::new(AtomicU64::new(0)); // 1 once the pod is doubted
    let (answered_after, failed_after) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (phase, answered, failed) = (Arc::clone(&phase), Arc::clone(&answered_after), Arc::clone(&failed_after));
        let (client, url) = (client.clone(), lab.url("/"));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                let after = phase.load(Ordering::SeqCst) == 1;
                let (client, url, answered, failed) =
                    (client.clone(), url.clone(), Arc::clone(&answered), Arc::clone(&failed));
                tokio::spawn(async move {
                    let ok = client.get(url).send().await.is_ok_and(|r| r.status() == 200);
                    if after {
                        answered.fetch_add(1, Ordering::SeqCst);
                        failed.fetch_add(u64::from(!ok), Ordering::SeqCst);
                    }
                });
            }
        })
    };

    let swept = eventually(LIMIT, || async { lab.envoy.metric("stall_sweeps").await.is_ok_and(|n| n > 0) }).await;
    assert!(swept, "no stall was noticed\n{}", lab.envoy.log_tail(40));
    // Every worker reads the shared table again within 100 ms; requests sent before the doubt
    // reach the pods within this wait too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client_hits = || silent.hits() - silent.probe_hits();
    let hits_at_doubt = client_hits();
    let answered = eventually(LIMIT, || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answered_after.load(Ordering::SeqCst) >= 400
    })
    .await;
    traffic.abort();
    assert!(answered, "requests sent after the doubt were not answered\n{}", lab.envoy.log_tail(40));
    let new_hits = client_hits() - hits_at_doubt;
    // Envoy's least-request balancer alone would still pick the silent pod whenever both of its
    // two random choices were it.
    assert_eq!(new_hits, 0, "client requests sent to the silent pod after it was doubted");
    assert_eq!(failed_after.load(Ordering::SeqCst), 0, "requests sent after the doubt failed");
    Ok(())
}
