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
    AccessEvent, AccessHook, FetchError, ImageFetcher, PrefetchConfig, Prefetcher, SecretRef, Target,
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
    /// Path -> fixture, answered whenever asked (pull secrets are read when needed).
    gets: Arc<HashMap<String, &'static str>>,
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
            gets: Arc::new(gets.iter().map(|(p, f)| (p.to_string(), *f)).collect()),
            log: Arc::default(),
        }
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
        if let Some(name) = self.gets.get(&path) {
            if !q.is_empty() {
                return self.fail(format!("unexpected query on {uri}"));
            }
            return full(StatusCode::OK, fixture(name));
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
            Step::Watch { resource_version, .. } | Step::WatchIdle { resource_version } => {
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
    task: tokio::task::JoinHandle<()>,
}

fn start(replay: Replay) -> Harness {
    let client = replay.client();
    let fetcher = Arc::new(CountingFetcher::default());
    let outcomes = Arc::new(Mutex::new(vec![]));
    let recorded = Arc::clone(&outcomes);
    let hook: AccessHook = Arc::new(move |event| {
        if let AccessEvent::Checked { image, auth, allowed, .. } = event {
            recorded.lock().unwrap().push((image.to_string(), auth.clone(), allowed));
        }
    });
    let config = PrefetchConfig {
        always_refresh: Duration::ZERO,
        initial_backoff: Duration::from_millis(10),
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
    Harness { replay, fetcher, prefetcher, outcomes, task }
}

const AUTH: &str = "registry.example.com/team-a/auth:v1";
const HEADERS: &str = "ghcr.io/example/headers:latest";
const RATELIMIT: &str = "ghcr.io/example/ratelimit:v2";

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
