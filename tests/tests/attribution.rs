//! Which endpoint failed is only recorded on evidence. Envoy tells a filter the endpoint of the
//! last attempt and how many attempts there were, not who failed the earlier ones; with
//! `endpointOverride`, Envoy's `override_host` policy walks the list in order and skips
//! addresses that are no longer in EDS without an attempt. A healthy endpoint must never be
//! blamed for that, and an address Envoy skipped before the first attempt is known to be gone.

use harness::gateway::{GatewaySpec, PRIMARY};
use harness::upstream::{Mode, Upstream};
use harness::{client, eventually, DebugHeader, Lab};
use std::time::Duration;

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const LIMIT: Duration = Duration::from_secs(60);

/// The filter's table still lists a pod that EDS has dropped, so steered lists name it; another
/// pod sheds load with a 503 to every other request, which Envoy retries on the next listed
/// endpoint. Clients see no failure, and neither live pod is ever ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_override_entries_and_retried_503s_eject_nothing_healthy() -> anyhow::Result<()> {
    let a = Upstream::start("pod-a").await?;
    let b = Upstream::start("pod-b").await?;
    let gone = Upstream::start("pod-gone").await?;
    let config = r#"{"debugHeader":true,"endpointOverride":{"exploreRatio":0}}"#;
    let spec = GatewaySpec { endpoint_override_header: Some(OVERRIDE_HEADER.into()), ..GatewaySpec::default() };
    let mut lab = Lab::start(spec, Some(config), &[a.addr, b.addr, gone.addr], &[]).await?;
    let client = client();

    // The filter learns all three pods from real answers.
    let learnt = eventually(LIMIT, || async {
        let _ = client.get(lab.url("/")).send().await;
        a.hits() > 0 && b.hits() > 0 && gone.hits() > 0
    })
    .await;
    assert!(learnt, "requests never reached all three pods");

    // The control plane removes the pod from EDS; the filter's table still has it.
    lab.set_endpoints(&[a.addr, b.addr])?;
    let gone_addr = gone.addr.to_string();
    let applied = eventually(LIMIT, || async {
        lab.envoy.get("/clusters").await.map(|c| !c.contains(&format!("{PRIMARY}::{gone_addr}"))).unwrap_or(false)
    })
    .await;
    assert!(applied, "Envoy never dropped the endpoint");
    drop(gone);

    a.set_mode(Mode::UnavailableEveryOther);
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let (mut failed, mut named_gone) = (0, 0);
    for _ in 0..300 {
        let resp = client.get(lab.url("/")).send().await?;
        if resp.status() != 200 {
            failed += 1;
        }
        let h = DebugHeader::of(&resp).unwrap_or_default();
        named_gone += usize::from(h.steered.contains(&gone_addr));
        assert!(
            !h.ejected.contains(&a_addr) && !h.ejected.contains(&b_addr),
            "a live pod was ejected: {h:?}\n{}",
            lab.envoy.log_tail(40)
        );
    }
    assert_eq!(failed, 0, "clients saw failures");
    assert!(a.unavailable_answers() > 0, "pod-a never answered 503, so nothing was retried");
    assert!(named_gone > 0, "no steered list named the address EDS dropped; the case was not exercised");
    // A steered request whose first attempt went past the dropped pod's entry proves it absent
    // from EDS: the filter forgets it instead of keeping it for the endpoint TTL. A probe cannot
    // show that (Envoy's balancer answers in the address's place), so traffic has to.
    let forgotten = eventually(LIMIT, || async {
        let _ = client.get(lab.url("/")).send().await;
        lab.envoy.metric("known_endpoints").await.is_ok_and(|n| n == 2)
    })
    .await;
    assert!(forgotten, "the pod EDS dropped is still counted as known");
    let log = lab.envoy.log();
    for addr in [&a_addr, &b_addr] {
        assert!(!log.contains(&format!("ejected {addr} ")), "{addr} was ejected:\n{}", lab.envoy.log_tail(40));
    }
    Ok(())
}
