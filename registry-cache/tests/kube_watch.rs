//! The Kubernetes source against recorded API traffic: a `kube::Client` over a tower service
//! that replays what the API server sent (fixtures under `tests/fixtures/kube/`) and asserts
//! every request kube makes.

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use oci_client::secrets::RegistryAuth;
use registry_cache::sources::kubernetes::{self, KubeSecrets};
use registry_cache::sources::{
    AccessEvent, AccessHook, Bindings, FetchError, ImageFetcher, PrefetchConfig, Prefetcher, SecretRef, Target,
    TargetStatus,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Body = BoxBody<Bytes, Infallible>;

const POLICIES: &str = "/apis/gateway.envoyproxy.io/v1alpha1/envoyextensionpolicies";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One expected list or watch request, in order.
enum Step {
    /// `GET POLICIES` without `watch`; the List fixture.
    List(&'static str),
    /// `GET POLICIES?watch=true&allowWatchBookmarks=true&resourceVersion=RV`; the newline-delimited
    /// events of a fixture, then the stream ends (as when the API server closes a watch).
    Watch { resource_version: &'static str, events: &'static str },
    /// A watch from RV that stays open with nothing to say: the end of the recording.
    WatchIdle { resource_version: &'static str },
    /// As `Watch`, with the events sent only once the test adds a permit to `gate`.
    WatchGated { resource_version: &'static str, events: &'static str, gate: Arc<tokio::sync::Semaphore> },
}

#[derive(Default)]
struct Log {
    next: usize,
    requests: Vec<String>,
    failures: Vec<String>,
    idle: bool,
}

#[derive(Clone)]
struct Replay {
    steps: Arc<Vec<Step>>,
    /// Path -> status and fixture, answered whenever asked (pull secrets are read when needed,
    /// and again periodically); the test may change the answer.
    gets: Arc<Mutex<HashMap<String, (StatusCode, &'static str)>>>,
    log: Arc<Mutex<Log>>,
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn full(status: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

impl Replay {
    fn new(steps: Vec<Step>, gets: &[(&str, &'static str)]) -> Self {
        Self {
            steps: Arc::new(steps),
            gets: Arc::new(Mutex::new(gets.iter().map(|(p, f)| (p.to_string(), (StatusCode::OK, *f))).collect())),
            log: Arc::default(),
        }
    }

    /// From now on, GET `path` is answered `status` with `fixture`.
    fn set_get(&self, path: &str, status: StatusCode, fixture: &'static str) {
        self.gets.lock().unwrap().insert(path.to_string(), (status, fixture));
    }

    fn client(&self) -> kube::Client {
        let replay = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let replay = replay.clone();
            async move { Ok::<_, Infallible>(replay.answer(req)) }
        });
        kube::Client::new(service, "default")
    }

    fn fail(&self, message: String) -> Response<Body> {
        let mut log = self.log.lock().unwrap();
        log.failures.push(message.clone());
        full(StatusCode::INTERNAL_SERVER_ERROR, message.into_bytes())
    }

    fn answer(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let uri = req.uri().clone();
        let path = uri.path().to_string();
        let q = query(&uri);
        self.log.lock().unwrap().requests.push(format!("{} {uri}", req.method()));
        if req.method() != http::Method::GET {
            return self.fail(format!("unexpected method: {} {uri}", req.method()));
        }
        let get = self.gets.lock().unwrap().get(&path).copied();
        if let Some((status, name)) = get {
            if !q.is_empty() {
                return self.fail(format!("unexpected query on {uri}"));
            }
            return full(status, fixture(name));
        }
        if path != POLICIES {
            return self.fail(format!("unexpected request: GET {uri}"));
        }
        let index = {
            let mut log = self.log.lock().unwrap();
            log.next += 1;
            log.next - 1
        };
        let Some(step) = self.steps.get(index) else {
            return self.fail(format!("request after the recording ended: GET {uri}"));
        };
        let watching = q.get("watch").map(String::as_str) == Some("true");
        match step {
            Step::List(name) => {
                if watching {
                    return self.fail(format!("step {index}: expected a list, got GET {uri}"));
                }
                full(StatusCode::OK, fixture(name))
            }
            Step::Watch { resource_version, .. }
            | Step::WatchIdle { resource_version }
            | Step::WatchGated { resource_version, .. } => {
                let problems: Vec<String> =
                    [("watch", "true"), ("allowWatchBookmarks", "true"), ("resourceVersion", resource_version)]
                        .iter()
                        .filter(|(k, v)| q.get(*k).map(String::as_str) != Some(*v))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                if !problems.is_empty() {
                    return self.fail(format!("step {index}: expected a watch with {problems:?}, got GET {uri}"));
                }
                if let Step::Watch { events, .. } = step {
                    full(StatusCode::OK, fixture(events))
                } else if let Step::WatchGated { events, gate, .. } = step {
                    let (gate, bytes) = (Arc::clone(gate), Bytes::from(fixture(events)));
                    let body = futures::stream::once(async move {
                        let _open = gate.acquire().await;
                        Ok::<_, Infallible>(http_body::Frame::data(bytes))
                    });
                    let mut r = Response::new(BodyExt::boxed(StreamBody::new(body)));
                    r.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    r
                } else {
                    self.log.lock().unwrap().idle = true;
                    let pending = futures::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
                    let mut r = Response::new(BodyExt::boxed(StreamBody::new(pending)));
                    r.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    r
                }
            }
        }
    }

    /// Waits until the recording has been played to its idle end.
    async fn played(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            {
                let log = self.log.lock().unwrap();
                assert!(
                    log.failures.is_empty(),
                    "unexpected requests: {:#?}\nall requests: {:#?}",
                    log.failures,
                    log.requests
                );
                if log.idle {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "recording not played: {:#?}",
                self.log.lock().unwrap().requests
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Counts pulls instead of reaching a registry.
#[derive(Default)]
struct CountingFetcher {
    pulls: Mutex<Vec<(String, RegistryAuth)>>,
    cached: Mutex<BTreeSet<String>>,
}

impl CountingFetcher {
    fn pulls_of(&self, image: &str) -> Vec<RegistryAuth> {
        self.pulls.lock().unwrap().iter().filter(|(i, _)| i == image).map(|(_, a)| a.clone()).collect()
    }
}

impl ImageFetcher for CountingFetcher {
    fn is_cached(&self, image: &str) -> bool {
        self.cached.lock().unwrap().contains(image)
    }

    fn pull<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<(), FetchError>> {
        self.pulls.lock().unwrap().push((image.to_string(), auth.clone()));
        self.cached.lock().unwrap().insert(image.to_string());
        Box::pin(async { Ok(()) })
    }

    fn can_read<'a>(&'a self, _image: &'a str, _auth: &'a RegistryAuth) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async { Ok(true) })
    }
}

struct Harness {
    replay: Replay,
    fetcher: Arc<CountingFetcher>,
    prefetcher: Prefetcher,
    outcomes: Arc<Mutex<Vec<(String, RegistryAuth, bool)>>>,
    /// The namespace bindings last published.
    bindings: Arc<Mutex<Bindings>>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Whether `namespace` is bound to `repository` through the credentials `auth`.
    fn bound(&self, namespace: &str, repository: &str, auth: &RegistryAuth) -> bool {
        let bindings = self.bindings.lock().unwrap();
        bindings.get(&(namespace.into(), repository.into())).is_some_and(|creds| creds.iter().any(|c| c.auth == *auth))
    }

    /// Waits (up to 30 s) until `bound` says `want`.
    async fn wait_bound(&self, namespace: &str, repository: &str, auth: &RegistryAuth, want: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.bound(namespace, repository, auth) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{namespace} bound to {repository}: want {want}; bindings {:?}; requests {:#?}",
                self.bindings.lock().unwrap(),
                self.replay.log.lock().unwrap().requests
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn start(replay: Replay) -> Harness {
    let client = replay.client();
    let fetcher = Arc::new(CountingFetcher::default());
    let outcomes = Arc::new(Mutex::new(vec![]));
    let bindings: Arc<Mutex<Bindings>> = Arc::default();
    let (recorded, published) = (Arc::clone(&outcomes), Arc::clone(&bindings));
    let hook: AccessHook = Arc::new(move |event| match event {
        AccessEvent::Checked { image, auth, allowed, .. } => {
            recorded.lock().unwrap().push((image.to_string(), auth.clone(), allowed))
        }
        AccessEvent::Bindings(b) => *published.lock().unwrap() = b.clone(),
    });
    let config = PrefetchConfig {
        always_refresh: Duration::ZERO,
        initial_backoff: Duration::from_millis(10),
        secret_recheck: Duration::from_millis(50),
        ..PrefetchConfig::default()
    };
    let prefetcher = Prefetcher::new(
        config,
        Arc::clone(&fetcher) as Arc<dyn ImageFetcher>,
        Arc::new(KubeSecrets::new(client.clone())),
        hook,
        &[kubernetes::SOURCE],
    );
    let task = tokio::spawn(kubernetes::run(client, prefetcher.clone()));
    Harness { replay, fetcher, prefetcher, outcomes, bindings, task }
}

const AUTH: &str = "registry.example.com/team-a/auth:v1";
const HEADERS: &str = "ghcr.io/example/headers:latest";
const RATELIMIT: &str = "ghcr.io/example/ratelimit:v2";
const AUTH_REPOSITORY: &str = "registry.example.com/team-a/auth";
const REGCRED: &str = "/api/v1/namespaces/team-a/secrets/regcred";

fn team_a_auth() -> RegistryAuth {
    RegistryAuth::Basic("team-a-puller".into(), "s3cret-a".into())
}

#[tokio::test]
async fn list_watch_bookmark_gone_relist() {
    let replay = Replay::new(
        vec![
            Step::List("list-initial.json"),
            Step::Watch { resource_version: "1002", events: "watch-from-list.jsonl" },
            Step::Watch { resource_version: "1050", events: "watch-from-bookmark-gone.jsonl" },
            Step::List("relist.json"),
            Step::WatchIdle { resource_version: "1210" },
        ],
        &[("/api/v1/namespaces/team-a/secrets/regcred", "secret-team-a-regcred.json")],
    );
    let h = start(replay);
    tokio::time::timeout(Duration::from_secs(30), h.prefetcher.wait_settled())
        .await
        .expect("settled after the initial list");
    h.replay.played().await;
    h.prefetcher.wait_idle().await;

    let desired = h.prefetcher.desired();
    let team_a =
        Target { image: AUTH.into(), secret: Some(SecretRef { namespace: "team-a".into(), name: "regcred".into() }) };
    let ratelimit = Target { image: RATELIMIT.into(), secret: None };
    assert_eq!(
        desired.keys().cloned().collect::<Vec<_>>(),
        vec![ratelimit, team_a],
        "team-b/headers was deleted while the watch was gone"
    );
    assert!(!h.prefetcher.desired_images().contains(HEADERS));

    let team_a_auth = RegistryAuth::Basic("team-a-puller".into(), "s3cret-a".into());
    // Each pulled once, with the namespace's secret or anonymously; the re-list re-pulled
    // nothing (same resourceVersions, IfNotPresent).
    assert_eq!(h.fetcher.pulls_of(AUTH), vec![team_a_auth.clone()]);
    assert_eq!(h.fetcher.pulls_of(RATELIMIT), vec![RegistryAuth::Anonymous]);
    assert_eq!(h.fetcher.pulls_of(HEADERS), vec![RegistryAuth::Anonymous], "pulled while it existed");
    assert_eq!(h.fetcher.pulls.lock().unwrap().len(), 3);
    assert!(
        h.outcomes.lock().unwrap().contains(&(AUTH.to_string(), team_a_auth, true)),
        "the permission layer learns the secret reads the image"
    );

    let requests = h.replay.log.lock().unwrap().requests.clone();
    let watches: Vec<&String> = requests.iter().filter(|r| r.contains(POLICIES)).collect();
    assert_eq!(watches.len(), 5, "list, watch, resumed watch, re-list, watch: {requests:#?}");
    assert!(requests.iter().any(|r| r.contains("/api/v1/namespaces/team-a/secrets/regcred")), "{requests:#?}");
    h.task.abort();
}

#[tokio::test]
async fn modified_and_deleted_events() {
    let replay = Replay::new(
        vec![
            Step::List("list-edge.json"),
            Step::Watch { resource_version: "2002", events: "watch-edge.jsonl" },
            // The watch ended after the DELETED event: resumed from its resourceVersion.
            Step::WatchIdle { resource_version: "2004" },
        ],
        &[],
    );
    let h = start(replay);
    h.replay.played().await;
    h.prefetcher.wait_idle().await;
    assert!(*h.prefetcher.settled().borrow());
    assert_eq!(h.prefetcher.desired_images(), BTreeSet::from(["ghcr.io/example/edge:latest".to_string()]));
    // `:latest` defaults to Always: the MODIFIED event (new resourceVersion) pulled it again.
    assert_eq!(h.fetcher.pulls_of("ghcr.io/example/edge:latest").len(), 2);
    assert_eq!(h.fetcher.pulls_of("ghcr.io/example/pinned:v3").len(), 1);
    h.task.abort();
}

#[tokio::test]
async fn unexpected_requests_fail_the_replay() {
    let replay = Replay::new(vec![Step::WatchIdle { resource_version: "1" }], &[]);
    let client = replay.client();
    let _ = client.request_text(Request::get("/api/v1/namespaces/x/pods").body(vec![]).unwrap()).await;
    assert_eq!(replay.log.lock().unwrap().failures.len(), 1);
    // A list where a watch from "1" is expected.
    let replay = Replay::new(vec![Step::WatchIdle { resource_version: "1" }], &[]);
    let client = replay.client();
    let _ = client.request_text(Request::get(POLICIES).body(vec![]).unwrap()).await;
    assert_eq!(replay.log.lock().unwrap().failures.len(), 1);
}

/// The pull Secret is read again while its policy stays: deleted (404 from the API server),
/// the namespace is unbound; created again, it is bound again.
#[tokio::test]
async fn a_deleted_pull_secret_unbinds_its_namespace() {
    let replay = Replay::new(
        vec![Step::List("list-initial.json"), Step::WatchIdle { resource_version: "1002" }],
        &[(REGCRED, "secret-team-a-regcred.json")],
    );
    let h = start(replay);
    h.replay.played().await;
    h.wait_bound("team-a", AUTH_REPOSITORY, &team_a_auth(), true).await;

    h.replay.set_get(REGCRED, StatusCode::NOT_FOUND, "secret-team-a-regcred-not-found.json");
    h.wait_bound("team-a", AUTH_REPOSITORY, &team_a_auth(), false).await;
    let status = h.prefetcher.desired().into_iter().find(|(t, _)| t.image == AUTH).map(|(_, s)| s);
    assert!(matches!(status, Some(TargetStatus::Failed(ref e)) if e.contains("not found")), "{status:?}");
    assert_eq!(h.fetcher.pulls_of(AUTH).len(), 1, "nothing pulled without the secret");

    h.replay.set_get(REGCRED, StatusCode::OK, "secret-team-a-regcred.json");
    h.wait_bound("team-a", AUTH_REPOSITORY, &team_a_auth(), true).await;
    let reads = h.replay.log.lock().unwrap().requests.iter().filter(|r| r.contains(REGCRED)).count();
    assert!(reads >= 3, "the Secret is read again, by name: {reads} reads");
    h.task.abort();
}

/// A DELETED event for the policy that bound a namespace unbinds it.
#[tokio::test]
async fn a_deleted_policy_unbinds_its_namespace() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let replay = Replay::new(
        vec![
            Step::List("list-initial.json"),
            Step::WatchGated {
                resource_version: "1002",
                events: "watch-delete-auth-filter.jsonl",
                gate: Arc::clone(&gate),
            },
            Step::WatchIdle { resource_version: "1003" },
        ],
        &[(REGCRED, "secret-team-a-regcred.json")],
    );
    let h = start(replay);
    h.wait_bound("team-a", AUTH_REPOSITORY, &team_a_auth(), true).await;
    gate.add_permits(1);
    h.replay.played().await;
    h.wait_bound("team-a", AUTH_REPOSITORY, &team_a_auth(), false).await;
    assert!(!h.prefetcher.desired_images().contains(AUTH));
    assert!(h.bindings.lock().unwrap().is_empty(), "{:?}", h.bindings.lock().unwrap());
    h.task.abort();
}
