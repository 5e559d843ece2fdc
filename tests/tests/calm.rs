//! While nothing goes wrong, most requests take the calm path (the method and the retry headers,
//! nothing else); trouble met on one worker ends the calm on every worker, so the next requests
//! everywhere are decided with what was learnt.

use harness::gateway::{FallbackRoute, GatewaySpec};
use harness::upstream::{Mode, Upstream};
use harness::{client, fresh_connection_client, Lab};
use std::time::Duration;

/// The trouble is met on one connection (so on one worker) at a cluster the healthy requests
/// never reach: the other worker learns of it only through the shared alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trouble_on_one_worker_ends_the_calm_of_every_worker() -> anyhow::Result<()> {
    let (a, b) = (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?);
    let sick = Upstream::start("pod-sick").await?;
    sick.set_mode(Mode::Unavailable);
    let spec = GatewaySpec {
        fallback: Some(FallbackRoute { header: "x-route".into(), value: "sick".into() }),
        ..GatewaySpec::default()
    };
    let lab = Lab::start(spec, Some("{}"), &[a.addr, b.addr], &[sick.addr]).await?;
    // A connection per request: requests spread over both workers.
    let spread = fresh_connection_client();
    let healthy_requests = || async {
        for _ in 0..100 {
            assert_eq!(spread.get(lab.url("/")).send().await?.status(), 200);
        }
        anyhow::Ok(())
    };
    healthy_requests().await?;
    let calm = lab.envoy.settled_metric("calm_requests").await?;
    assert!(calm > 0, "no request took the calm path while nothing was wrong");

    let pinned = client();
    let resp = pinned.get(lab.url("/")).header("x-route", "sick").send().await?;
    assert_eq!(resp.status(), 503);
    assert!(sick.hits() > 1, "the sick pod's 503 was not retried: nothing to notice");
    // The alarm is read on every tick (50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = lab.envoy.settled_metric("calm_requests").await?;
    healthy_requests().await?;
    let after = lab.envoy.settled_metric("calm_requests").await?;
    assert_eq!(after, before, "a worker stayed calm after another met trouble");
    Ok(())
}
