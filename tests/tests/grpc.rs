//! gRPC over HTTP/2 behind real Envoy: tonic's gRPC server on h2c endpoints, tonic's client in
//! front. A failed gRPC call is an HTTP 200 whose `grpc-status` says so, in a trailers-only
//! answer or in the trailers; churn-guard reads it to retry the call and to know the endpoint
//! is failing.

use harness::gateway::GatewaySpec;
use harness::grpc::{self, GrpcMode, GrpcUpstream};
use harness::{eventually, Lab};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const STEERING: &str = r#"{"endpointOverride":{"exploreRatio":0}}"#;
const LIMIT: Duration = Duration::from_secs(60);

fn spec(steering: bool) -> GatewaySpec {
    GatewaySpec {
        upstream_http2: true,
        endpoint_override_header: steering.then(|| OVERRIDE_HEADER.to_string()),
        ..GatewaySpec::default()
    }
}

/// With `{}`, an endpoint answering UNAVAILABLE (trailers-only, as a server shutting down does)
/// costs callers nothing: the call is retried on another endpoint, as Envoy Gateway's default
/// gRPC retry triggers would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_calls_are_retried_on_another_endpoint() -> anyhow::Result<()> {
    let a = GrpcUpstream::start("pod-a").await?;
    let b = GrpcUpstream::start("pod-b").await?;
    let c = GrpcUpstream::start("pod-c").await?;
    a.set_mode(GrpcMode::Unavailable);
    let lab = Lab::start(spec(false), Some("{}"), &[a.addr, b.addr, c.addr], &[]).await?;
    let mut client = grpc::client(lab.port).await?;
    // Envoy picks each retry's endpoint afresh (header retries carry no host predicate): with
    // one endpoint in three failing, eleven attempts all landing on it is a one in 177,147 event.
    for i in 0..60 {
        let answered = grpc::check(&mut client).await;
        assert!(matches!(answered.as_deref(), Ok("pod-b" | "pod-c")), "call {i}: {answered:?}");
    }
    assert!(a.unavailable_answers() > 0, "pod-a was never asked, so nothing was retried");
    assert!(lab.envoy.metric("retries_performed").await? >= a.unavailable_answers());
    Ok(())
}

/// UNAVAILABLE in the trailers, after the answer began, cannot be retried; it still counts
/// against the endpoint. Steering then keeps calls away from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_in_trailers_ejects_the_endpoint() -> anyhow::Result<()> {
    let a = GrpcUpstream::start("pod-a").await?;
    let b = GrpcUpstream::start("pod-b").await?;
    let lab = Lab::start(spec(true), Some(STEERING), &[a.addr, b.addr], &[]).await?;
    let mut client = grpc::client(lab.port).await?;
    // The filter learns both pods from real answers.
    let (pod_a, pod_b) = (&a, &b);
    let learnt = eventually(LIMIT, || {
        let mut client = client.clone();
        async move { grpc::watch(&mut client).await.1.is_ok() && pod_a.calls() > 0 && pod_b.calls() > 0 }
    })
    .await;
    assert!(learnt, "calls never reached both pods");
    a.set_mode(GrpcMode::Unavailable);
    let (envoy, ejected_line) = (&lab.envoy, format!("ejected {} ", a.addr));
    let ejected = eventually(LIMIT, || {
        let mut client = client.clone();
        let ejected_line = &ejected_line;
        async move {
            let _ = grpc::watch(&mut client).await;
            envoy.log().contains(ejected_line)
        }
    })
    .await;
    assert!(
        ejected,
        "pod-a failed {} calls and was never ejected\n{}",
        a.unavailable_answers(),
        lab.envoy.log_tail(20)
    );
    let failed_before = a.unavailable_answers();
    assert!(failed_before >= 1, "the failure was never shown");
    for i in 0..30 {
        let (messages, end) = grpc::watch(&mut client).await;
        assert!(end.is_ok() && messages == 1, "call {i} after the ejection: {end:?}\n{}", lab.envoy.log_tail(12));
    }
    assert_eq!(a.unavailable_answers(), failed_before, "calls still reached the ejected endpoint");
    Ok(())
}

/// A rolling restart of gRPC pods, the control plane late: old pods first answer UNAVAILABLE
/// while they shut down, then GOAWAY their connections, then refuse, and Envoy keeps listing
/// them for 2 s more. Four callers call all along; at most one call in 2,000 fails (usually
/// none; `make bench` S6 measures the same shape at 300 calls/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_fails_no_grpc_call() -> anyhow::Result<()> {
    let mut old = vec![];
    for name in ["old-a", "old-b", "old-c"] {
        old.push(GrpcUpstream::start(name).await?);
    }
    let old_addrs: Vec<_> = old.iter().map(|p| p.addr).collect();
    // The default explore share: new pods are found while old ones are steered around.
    let mut lab = Lab::start(spec(true), Some(r#"{"endpointOverride":{}}"#), &old_addrs, &[]).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut callers = vec![];
    for _ in 0..4 {
        let mut client = grpc::client(lab.port).await?;
        let (stop, calls, failures) = (Arc::clone(&stop), Arc::clone(&calls), Arc::clone(&failures));
        callers.push(tokio::spawn(async move {
            let mut first_failure = None;
            while !stop.load(Ordering::SeqCst) {
                calls.fetch_add(1, Ordering::SeqCst);
                if let Err(status) = grpc::check(&mut client).await {
                    failures.fetch_add(1, Ordering::SeqCst);
                    first_failure.get_or_insert(status);
                }
            }
            first_failure
        }));
    }
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;

    let mut new = vec![];
    for name in ["new-a", "new-b", "new-c"] {
        new.push(GrpcUpstream::start(name).await?);
    }
    let new_addrs: Vec<_> = new.iter().map(|p| p.addr).collect();
    for (i, pod) in old.iter_mut().enumerate() {
        pod.set_mode(GrpcMode::Unavailable);
        pause().await;
        pod.drain();
        pause().await;
        if i == 0 {
            // The control plane learns of the new pods late, and of the old ones' end later.
            lab.set_endpoints(&[old_addrs.clone(), new_addrs.clone()].concat())?;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.set_endpoints(&new_addrs)?;
    pause().await;
    stop.store(true, Ordering::SeqCst);
    let mut first_failure = None;
    for caller in callers {
        if let Some(status) = caller.await? {
            first_failure.get_or_insert(status);
        }
    }
    let shed: u64 = old.iter().map(GrpcUpstream::unavailable_answers).sum();
    let served_new: u64 = new.iter().map(GrpcUpstream::calls).sum();
    // Calls Envoy's own balancer places (the explore share, or all of them once every endpoint
    // the filter knows is gone) are retried on random endpoints, dead ones included: rarely, all
    // eleven attempts find dead pods. The previous module failed one call in eight here.
    let (failed, calls) = (failures.load(Ordering::SeqCst), calls.load(Ordering::SeqCst));
    assert!(
        failed * 2_000 <= calls,
        "{failed} of {calls} calls failed; first: {first_failure:?}\n{}",
        lab.envoy.log_tail(30)
    );
    assert!(shed > 0, "no old pod ever answered UNAVAILABLE: the shutdown was not exercised");
    assert!(served_new > 0, "the new pods never served");
    Ok(())
}
