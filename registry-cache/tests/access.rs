//! `Puller::can_read`, the answer grants and pre-pull retries hang on: `Ok(false)` only when the
//! registry (or its token service) refuses the credentials, `Err` for everything it could not
//! answer, within a bound.
//!
//! Basic auth against a real private registry (Debian's `docker-registry`, htpasswd), behind the
//! fault-injecting proxy; the Bearer token flow against a stub of a token-auth registry (a test
//! double of a third-party service: `docker-registry` with htpasswd only speaks Basic).

mod common;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{auth, push, wasm_module, Fault, Proxy, PASSWORD, USER};
use oci_client::secrets::RegistryAuth;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn wrong() -> RegistryAuth {
    RegistryAuth::Basic(USER.into(), "wrong".into())
}

#[tokio::test]
async fn basic_auth_registry_answers_true_false_and_errors_precisely() {
    let registry = common::registry().await;
    let image = push(registry.addr, "wasm/access", &wasm_module("access", 0)).await;
    let puller = common::puller(registry.addr, Duration::from_secs(5));
    assert_eq!(puller.can_read(&image, &auth()).await, Ok(true));
    assert_eq!(puller.can_read(&image, &wrong()).await, Ok(false));
    assert_eq!(puller.can_read(&image, &RegistryAuth::Anonymous).await, Ok(false));
    let missing = format!("{}/wasm/nothing-here:v1", registry.addr);
    assert_eq!(puller.can_read(&missing, &auth()).await, Ok(false));
    let missing_tag = format!("{}/wasm/access:v9", registry.addr);
    assert_eq!(puller.can_read(&missing_tag, &auth()).await, Ok(false));

    // Through the proxy: faithful, then an outage of everything, which is no refusal.
    let proxy = Proxy::start(registry.addr).await;
    let puller = common::puller(proxy.addr, Duration::from_secs(5));
    let proxied = format!("{}/wasm/access:v1", proxy.addr);
    assert_eq!(puller.can_read(&proxied, &auth()).await, Ok(true));
    proxy.set(Fault::Unavailable);
    for credentials in [auth(), wrong(), RegistryAuth::Anonymous] {
        let answer = puller.can_read(&proxied, &credentials).await;
        assert!(answer.as_ref().is_err_and(|e| e.contains("503")), "a 503 outage must be Err: {answer:?}");
    }
}

#[tokio::test]
async fn an_unreachable_or_stalled_registry_is_an_error_within_the_bound() {
    // Connection refused: a port nobody listens on any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let puller = common::puller(closed, Duration::from_secs(2));
    let answer = puller.can_read(&format!("{closed}/wasm/x:v1"), &auth()).await;
    assert!(answer.is_err(), "connection refused: {answer:?}");

    // A registry that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stalled = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let puller = common::puller(stalled, Duration::from_secs(2));
    let started = Instant::now();
    let answer = puller.can_read(&format!("{stalled}/wasm/x:v1"), &auth()).await;
    assert!(answer.is_err(), "a stall: {answer:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// What the stub's manifest endpoint does.
#[derive(Clone, Copy, PartialEq)]
enum Manifest {
    /// 200 with a digest for `Bearer t`, 401 otherwise.
    Serve,
    /// 401 whatever the token: a token service that hands out tokens the registry refuses.
    Refuse,
    Fail500,
    /// HEAD is 405; GET behaves as `Serve`.
    NoHead,
}

struct Stub {
    addr: SocketAddr,
    token_down: Mutex<bool>,
    manifest: Mutex<Manifest>,
    /// Query strings the token endpoint was asked with.
    token_queries: Mutex<Vec<String>>,
}

/// A registry with Docker's token auth: `/v2/` challenges to `/token`, which hands out `t` for
/// the test credentials; the manifest `wasm/stub:v1` needs it.
async fn stub() -> Arc<Stub> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stub = Arc::new(Stub {
        addr,
        token_down: Mutex::new(false),
        manifest: Mutex::new(Manifest::Serve),
        token_queries: Mutex::new(vec![]),
    });
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&stub));
    tokio::spawn(async move { axum::serve(listener, app).await });
    stub
}

async fn handle(State(stub): State<Arc<Stub>>, request: Request) -> Response {
    let authorization =
        request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    match request.uri().path() {
        "/v2/" => {
            let challenge = format!(r#"Bearer realm="http://{}/token",service="stub""#, stub.addr);
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
        }
        "/token" => {
            stub.token_queries.lock().unwrap().push(request.uri().query().unwrap_or("").to_string());
            if *stub.token_down.lock().unwrap() {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            if authorization == common::basic(USER, PASSWORD) {
                axum::Json(serde_json::json!({"token": "t"})).into_response()
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        }
        "/v2/wasm/stub/manifests/v1" => {
            let mode = *stub.manifest.lock().unwrap();
            let accept = request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
            assert!(accept.contains("application/vnd.oci.image.manifest.v1+json"), "Accept: {accept}");
            match mode {
                Manifest::Fail500 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                Manifest::Refuse => StatusCode::UNAUTHORIZED.into_response(),
                Manifest::NoHead if request.method() == Method::HEAD => StatusCode::METHOD_NOT_ALLOWED.into_response(),
                _ if authorization == "Bearer t" => {
                    (StatusCode::OK, [("docker-content-digest", format!("sha256:{}", "a".repeat(64)))]).into_response()
                }
                _ => StatusCode::UNAUTHORIZED.into_response(),
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test]
async fn token_auth_registry_tells_refusals_from_outages() {
    let stub = stub().await;
    let image = format!("{}/wasm/stub:v1", stub.addr);
    let puller = common::puller(stub.addr, Duration::from_secs(5));
    assert_eq!(puller.can_read(&image, &auth()).await, Ok(true));
    let asked = stub.token_queries.lock().unwrap().clone();
    assert!(
        asked.iter().all(|q| q.contains("scope=repository%3Awasm%2Fstub%3Apull") && q.contains("service=stub")),
        "{asked:?}"
    );
    assert_eq!(puller.can_read(&image, &wrong()).await, Ok(false));
    assert_eq!(puller.can_read(&image, &RegistryAuth::Anonymous).await, Ok(false));
    // A token the client holds is used as is.
    assert_eq!(puller.can_read(&image, &RegistryAuth::Bearer("t".into())).await, Ok(true));
    assert_eq!(puller.can_read(&image, &RegistryAuth::Bearer("stale".into())).await, Ok(false));

    // The bug: a token-service outage read as "these credentials may not read".
    *stub.token_down.lock().unwrap() = true;
    let answer = puller.can_read(&image, &auth()).await;
    assert!(answer.as_ref().is_err_and(|e| e.contains("503")), "token service 503 must be Err: {answer:?}");
    *stub.token_down.lock().unwrap() = false;

    *stub.manifest.lock().unwrap() = Manifest::Refuse;
    assert_eq!(puller.can_read(&image, &auth()).await, Ok(false), "a token, then the manifest refused");
    *stub.manifest.lock().unwrap() = Manifest::Fail500;
    let answer = puller.can_read(&image, &auth()).await;
    assert!(answer.as_ref().is_err_and(|e| e.contains("500")), "manifest 500 must be Err: {answer:?}");
    *stub.manifest.lock().unwrap() = Manifest::NoHead;
    assert_eq!(puller.can_read(&image, &auth()).await, Ok(true), "GET when HEAD is not allowed");
    assert_eq!(puller.can_read(&image, &wrong()).await, Ok(false));
}
