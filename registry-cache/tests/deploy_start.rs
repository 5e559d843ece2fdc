//! `deploy/` as shipped must start: render it with `kubectl kustomize`, lay out the files
//! exactly as the kubelet would mount them (a Secret volume with `items` holds those keys
//! only), run the real binary with the rendered args, and wait for `/readyz` over HTTPS,
//! trusting only the CA of the TLS Secret, and for `/status` to show the policy list read. The
//! Kubernetes API it watches is a stand-in on loopback that lists no policies and keeps the
//! watch open.

mod common;

use bytes::Bytes;
use harness::envoy::workspace_root;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use registry_cache::sign::SigningKey;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_registry-cache");

fn rendered_statefulset() -> Value {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(workspace_root().join("deploy"))
        .output()
        .expect("kubectl kustomize (run scripts/setup.sh, or set KUBECTL)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let workload = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .find(|d: &Value| d["kind"] == "StatefulSet");
    workload.expect("a StatefulSet")
}

/// A Kubernetes API with no EnvoyExtensionPolicy: lists are empty, watches stay open.
async fn empty_api_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let watch = req.uri().query().unwrap_or_default().contains("watch=true");
                    if watch {
                        // Nothing changes: hold the watch open as the API server does.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    let body = r#"{"apiVersion":"gateway.envoyproxy.io/v1alpha1","kind":"EnvoyExtensionPolicyList","metadata":{"resourceVersion":"1"},"items":[]}"#;
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

type Secrets = BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>;

/// The user's Secrets, as `deploy/README.md` says to create them: by name, then by key. The
/// TLS Secret holds a leaf of `ca` and the CA, as cert-manager writes it.
fn user_secrets(url_key: &[u8], ca: &common::TestCa) -> Secrets {
    let key = SigningKey::generate().expect("key").to_pkcs8_pem().expect("pem");
    let (crt, tls_key) = ca.leaf();
    BTreeMap::from([
        (
            "registry-cache-signing-key",
            BTreeMap::from([("cosign.key".to_string(), key.into_bytes()), ("url.key".to_string(), url_key.to_vec())]),
        ),
        (
            "registry-cache-tls",
            BTreeMap::from([
                ("tls.crt".to_string(), crt),
                ("tls.key".to_string(), tls_key),
                ("ca.crt".to_string(), ca.cert.clone()),
            ]),
        ),
    ])
}

/// Mounts the pod's volumes under `root` as the kubelet would (a claim from the StatefulSet's
/// volumeClaimTemplates as an empty directory) and returns the container's args with paths
/// under `root`, listening on `listen`.
fn lay_out(workload: &Value, root: &Path, secrets: &Secrets, listen: &str) -> Vec<String> {
    let pod = &workload["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mut volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    for claim in workload["spec"]["volumeClaimTemplates"].as_array().cloned().unwrap_or_default() {
        volumes.push(serde_json::json!({"name": claim["metadata"]["name"], "persistentVolumeClaim": {}}));
    }
    let mut mounts = vec![];
    for m in container["volumeMounts"].as_array().cloned().unwrap_or_default() {
        let path = m["mountPath"].as_str().expect("mountPath").to_string();
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).expect("mount dir");
        let volume = volumes.iter().find(|v| v["name"] == m["name"]).expect("volume");
        if let Some(s) = volume.get("secret") {
            let name = s["secretName"].as_str().expect("secretName");
            let secret = secrets
                .get(name)
                .unwrap_or_else(|| panic!("deploy/ mounts Secret {name}, which no README step creates"));
            match s["items"].as_array() {
                // Only the listed keys become files, under their paths.
                Some(items) => {
                    for item in items {
                        let (key, file) = (item["key"].as_str().expect("key"), item["path"].as_str().expect("path"));
                        if let Some(value) = secret.get(key) {
                            std::fs::write(dir.join(file), value).expect("secret file");
                        }
                    }
                }
                None => {
                    for (key, value) in secret {
                        std::fs::write(dir.join(key), value).expect("secret file");
                    }
                }
            }
        }
        mounts.push((path, dir));
    }
    let args: Vec<String> =
        container["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    args.iter()
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                return listen.to_string();
            }
            match mounts.iter().filter(|(m, _)| a.starts_with(m.as_str())).max_by_key(|(m, _)| m.len()) {
                Some((m, dir)) => dir.join(a[m.len()..].trim_start_matches('/')).to_string_lossy().into_owned(),
                None => a.clone(),
            }
        })
        .collect()
}

fn kubeconfig(dir: &Path, api: std::net::SocketAddr) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{api}\n\
         contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: nobody\n    namespace: churn-guard-system\n\
         current-context: stand-in\nusers:\n- name: nobody\n  user: {{}}\n"
    );
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

fn serve(args: &[String], kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_statefulset_starts_and_becomes_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = empty_api_server().await;
    let kubeconfig = kubeconfig(dir.path(), api);
    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").to_string();
    let root = dir.path().join("pod");
    let ca = common::TestCa::new(dir.path(), "deploy");
    let args = lay_out(&rendered_statefulset(), &root, &user_secrets(&[0x5a; 32], &ca), &listen);
    let mut child = serve(&args, &kubeconfig).spawn().expect("registry-cache");
    let client = common::https_client(&ca.cert);
    let base = format!("https://localhost:{}", listen.rsplit(':').next().expect("port"));
    // Ready over HTTPS, and the policy list (empty) read from the API server with the rendered args.
    let ready = harness::eventually(Duration::from_secs(60), || async {
        let ready = common::get_ok(&client, &format!("{base}/readyz")).await;
        let Ok(status) = client.get(format!("{base}/status")).send().await else { return false };
        let status: Value = serde_json::from_str(&status.text().await.unwrap_or_default()).unwrap_or_default();
        ready && status["policySources"] == true && status["initialSyncSettled"] == true
    })
    .await;
    if !ready {
        let _ = child.start_kill();
        let out = child.wait_with_output().await.expect("output");
        panic!("not ready with args {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(child.try_wait().expect("status").is_none(), "exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_secrets_placeholder_url_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(workspace_root().join("deploy/signing-key-secret.example.yaml"))
        .expect("example Secret");
    let example: Value = serde_yaml_ng::from_str(&example).expect("yaml");
    let placeholder = example["stringData"]["url.key"].as_str().expect("url.key").as_bytes().to_vec();
    assert!(placeholder.len() >= 32, "long enough to pass a length check: that is the point");
    let kubeconfig = kubeconfig(dir.path(), empty_api_server().await);
    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").to_string();
    let ca = common::TestCa::new(dir.path(), "deploy");
    let args = lay_out(&rendered_statefulset(), &dir.path().join("pod"), &user_secrets(&placeholder, &ca), &listen);
    let out = tokio::time::timeout(Duration::from_secs(30), serve(&args, &kubeconfig).output())
        .await
        .expect("exits at once")
        .expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("placeholder") && err.contains("url.key"), "{err}");
}
