//! A pod that stops answering without failing anything: its address vanished (packets
//! dropped, no reset) or its process froze. Envoy learns of it only when a connect or per-try
//! timeout fires, seconds later, and Envoy Gateway sets no per-try timeout by default. Until
//! then every request sent there waits. The filter must notice from time alone and send new
//! requests elsewhere.

use harness::gateway::GatewaySpec;
use harness::upstream::{Mode, Upstream};
use harness::{client, eventually, DebugHeader, Lab};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const LIMIT: Duration = Duration::from_secs(60);

/// Three pods; one goes silent under steady traffic. The filter doubts it after a request
/// there waits past `stallAfterMs`, and from then on no client request is sent there: steered
/// lists put it last, behind two pods that answer, and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_stops_answering_gets_no_new_requests_long_before_any_timeout() -> anyhow::Result<()> {
    let a = Upstream::start("pod-a").await?;
    let b = Upstream::start("pod-b").await?;
    let silent = Upstream::start("pod-silent").await?;
    let config = r#"{"debugHeader":true,"endpointOverride":{"exploreRatio":0}}"#;
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
    let silent_addr = silent.addr.to_string();
    // Open-loop traffic: requests that land on the silent pod wait (up to the client's 30 s)
    // without holding the others back. Phase 1 starts once the pod is seen doubted.
    let phase = Arc::new(AtomicU64::new(0));
    let doubted_seen = Arc::new(AtomicU64::new(0));
    let (answered_after, failed_after, misrouted_after) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let counters = [&phase, &doubted_seen, &answered_after, &failed_after, &misrouted_after].map(Arc::clone);
        let (client, url, silent_addr) = (client.clone(), lab.url("/"), silent_addr.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                let [phase, doubted, answered, failed, misrouted] = counters.clone();
                let (client, url, silent_addr) = (client.clone(), url.clone(), silent_addr.clone());
                let after = phase.load(Ordering::SeqCst) == 1;
                tokio::spawn(async move {
                    let resp = client.get(url).send().await;
                    let ok = resp.as_ref().is_ok_and(|r| r.status() == 200);
                    let steered = resp.as_ref().ok().and_then(DebugHeader::of).map(|h| h.steered).unwrap_or_default();
                    // Steered, with the silent pod behind every pod that answers.
                    let avoided = steered.last() == Some(&silent_addr) && steered.len() > 1;
                    doubted.fetch_add(u64::from(avoided), Ordering::SeqCst);
                    if after {
                        answered.fetch_add(1, Ordering::SeqCst);
                        failed.fetch_add(u64::from(!ok), Ordering::SeqCst);
                        misrouted.fetch_add(u64::from(!avoided), Ordering::SeqCst);
                    }
                });
            }
        })
    };

    let seen = eventually(LIMIT, || async { doubted_seen.load(Ordering::SeqCst) > 0 }).await;
    assert!(seen, "the silent pod was never steered around\n{}", lab.envoy.log_tail(40));
    assert!(lab.envoy.metric("stall_sweeps").await? > 0, "doubted without a stall sweep?");
    // Every worker reads the shared table again within 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    phase.store(1, Ordering::SeqCst);
    // Requests sent before phase 1 reach the pods within this wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client_hits = || silent.hits() - silent.probe_hits();
    let hits_at_doubt = client_hits();
    let answered = eventually(LIMIT, || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answered_after.load(Ordering::SeqCst) >= 400
    })
    .await;
    traffic.abort();
    assert!(answered, "requests sent after the doubt were not answered\n{}", lab.envoy.log_tail(40));
    assert_eq!(misrouted_after.load(Ordering::SeqCst), 0, "requests not steered around the silent pod");
    assert_eq!(failed_after.load(Ordering::SeqCst), 0, "requests sent after the doubt failed");
    // Envoy's least-request balancer alone would still pick the silent pod whenever both of its
    // two random choices were it.
    assert_eq!(client_hits() - hits_at_doubt, 0, "client requests reached the silent pod after it was doubted");
    Ok(())
}
