//! The binary as an operator uses it, against a real private registry: push a module, let
//! `serve` pre-pull it from a policy on disk and serve it over TLS, `render` the policy, and
//! fetch the module the way Envoy Gateway does, by the rendered URL trusting the CA the policy
//! names, which works for the policy's namespace only and only while the policy is there.
//! `verify` runs beside `serve`; SIGTERM stops it.

mod common;

use harness::registry::DockerRegistry;
use registry_cache::artifact::sha256_hex;
use registry_cache::sign::SigningKey;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_registry-cache");

fn module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0\0\x0e\x0dcli-test-flow".to_vec();
    m.extend_from_slice(&[0; 64]);
    m
}

async fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().await.expect("registry-cache");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn policy(image: &str) -> String {
    format!(
        "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: EnvoyExtensionPolicy\nmetadata:\n  name: filter\n  namespace: shop\n\
         spec:\n  targetRefs:\n    - group: gateway.networking.k8s.io\n      kind: HTTPRoute\n      name: backend\n\
         \x20 wasm:\n    - name: filter\n      code:\n        type: Image\n        image:\n          url: {image}\n\
         \x20         pullSecretRef:\n            name: regcred\n"
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_serve_render_fetch_verify_and_stop() {
    let registry = DockerRegistry::start("cli", "cli-s3cret").await.expect("docker-registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let (auth, wasm, cache, policies) =
        (dir.path().join("auth.json"), dir.path().join("m.wasm"), dir.path().join("cache"), dir.path().join("p"));
    std::fs::write(&auth, registry.docker_config()).expect("auth");
    std::fs::write(&wasm, module()).expect("module");
    std::fs::create_dir_all(&policies).expect("policies dir");
    let addr = registry.addr.to_string();
    let image = format!("{addr}/filters/cli:v1");

    let (ok, out, err) = run(&["push", s(&wasm), &image, "--auth", s(&auth), "--insecure-registry", &addr]).await;
    assert!(ok, "push: {err}");
    assert!(out.contains("compat format"), "{out}");

    let key = SigningKey::generate().expect("key");
    let (key_file, pub_file, url_key, config) = (
        dir.path().join("cosign.key"),
        dir.path().join("cosign.pub"),
        dir.path().join("url.key"),
        dir.path().join("config.yaml"),
    );
    std::fs::write(&key_file, key.to_pkcs8_pem().expect("pem")).expect("key file");
    std::fs::write(&pub_file, key.public_key().to_pem()).expect("pub file");
    std::fs::write(&url_key, [7u8; 32]).expect("url key");
    std::fs::write(&config, format!("sources:\n  directories: [{}]\n  rescanSeconds: 1\n", s(&policies))).expect("cfg");
    std::fs::write(policies.join("policy.yaml"), policy(&image)).expect("policy");
    std::fs::write(policies.join("secret.yaml"), registry.pull_secret("shop", "regcred")).expect("secret");

    let ca = common::TestCa::new(dir.path(), "cli");
    let (crt, tls_key) = ca.leaf();
    let (crt_file, tls_key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&crt_file, crt).expect("tls.crt");
    std::fs::write(&tls_key_file, tls_key).expect("tls.key");

    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let mut serve = Command::new(BIN)
        .args(["serve", "--cache-dir", s(&cache), "--listen", &listen.to_string(), "--config", s(&config)])
        .args(["--signing-key", s(&key_file), "--url-key", s(&url_key), "--insecure-registry", &addr])
        .args(["--tls-cert", s(&crt_file), "--tls-key", s(&tls_key_file)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    // Envoy Gateway trusts the CA that the rendered policy names, and nothing else.
    let https = common::https_client(&ca.cert);
    let base = format!("https://localhost:{}", listen.port());
    // `/readyz` says only that serve serves; `/status` says the image is pulled and the
    // namespace's pull secret confirmed.
    let pulled = harness::eventually(Duration::from_secs(60), || async {
        let Ok(r) = https.get(format!("{base}/status")).send().await else { return false };
        let status: serde_json::Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
        status["targets"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["image"] == image.as_str() && t["status"] == "ready"))
    })
    .await;
    assert!(pulled, "serve never pre-pulled {image}");
    assert!(common::get_ok(&https, &format!("{base}/readyz")).await, "serve serves but is not ready");

    // verify reads the cache serve is writing, and the artifact was signed as it was cached.
    let (ok, out, err) = run(&["verify", "--cache-dir", s(&cache), "--key", s(&pub_file)]).await;
    assert!(ok && out.contains("verified"), "verify: {out}{err}");

    let policy_file = policies.join("policy.yaml");
    let (ok, rendered, err) =
        run(&["render", s(&policy_file), "--cache-dir", s(&cache), "--base-url", &base, "--url-key", s(&url_key)])
            .await;
    assert!(ok, "render: {err}");
    let docs = harness::crds::yaml_docs_str(&rendered).expect("yaml");
    let doc = &docs[0];
    let url = doc["spec"]["wasm"][0]["code"]["http"]["url"].as_str().expect("url").to_string();
    let ca_ref = &doc["spec"]["wasm"][0]["code"]["http"]["tls"]["caCertificateRef"];
    assert_eq!(ca_ref["name"], "registry-cache-tls", "{rendered}");
    assert_eq!(docs[1]["kind"], "ReferenceGrant", "{rendered}");
    let sha = doc["spec"]["wasm"][0]["code"]["http"]["sha256"].as_str().expect("sha256").to_string();
    assert_eq!(sha, sha256_hex(&module()));
    assert!(url.contains("namespace=shop&token="), "{url}");

    let get = |u: String| {
        let https = https.clone();
        async move { https.get(u).send().await.expect("request") }
    };
    let fetched = get(url.clone()).await;
    assert_eq!(fetched.status(), 200, "Envoy's fetch of the rendered URL");
    assert_eq!(sha256_hex(&fetched.bytes().await.expect("body")), sha);
    let bare = url.split('?').next().unwrap_or_default().to_string();
    assert_eq!(get(bare.clone()).await.status(), 404, "a private module without a token");
    assert_eq!(get(url.replace("namespace=shop", "namespace=other")).await.status(), 404, "another namespace");
    let token = url.rsplit("token=").next().unwrap_or_default().to_string();
    let forged = format!("{bare}?namespace=shop&token={}", token.chars().rev().collect::<String>());
    assert_eq!(get(forged).await.status(), 404, "a forged token");

    // Applied as rendered, the policy keeps the module's URL working for its namespace.
    std::fs::write(&policy_file, &rendered).expect("rendered policy");
    tokio::time::sleep(Duration::from_secs(3)).await; // a few rescans
    assert_eq!(get(url.clone()).await.status(), 200, "the rendered policy must keep its namespace bound");

    // The policy goes away: its namespace's URL stops working at the next scan.
    std::fs::remove_file(&policy_file).expect("remove policy");
    let revoked = harness::eventually(Duration::from_secs(30), || {
        let (url, https) = (url.clone(), https.clone());
        async move { https.get(url).send().await.is_ok_and(|r| r.status() == 404) }
    })
    .await;
    assert!(revoked, "the URL still works after the policy was removed");

    let pid = serve.id().expect("pid") as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), serve.wait()).await.expect("serve ignored SIGTERM");
    assert!(status.expect("wait").success(), "serve should exit cleanly on SIGTERM");
}

/// A file the command line names that is missing is reported with its path and what it should
/// have been, not as a bare "No such file or directory".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_files_are_named_in_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let missing = dir.path().join("no-such-file");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let (ok, _, err) = run(&["pull", "127.0.0.1:1/x:v1", "--cache-dir", s(&cache), "--auth", s(&missing)]).await;
    assert!(!ok && err.contains(s(&missing)) && err.contains("config.json"), "{err}");
    let (ok, _, err) = run(&["pull", "127.0.0.1:1/x:v1", "--cache-dir", s(&cache), "--ca-cert", s(&missing)]).await;
    assert!(!ok && err.contains(s(&missing)) && err.contains("PEM"), "{err}");
    let (ok, _, err) = run(&["render", s(&missing), "--cache-dir", s(&cache)]).await;
    assert!(!ok && err.contains(s(&missing)) && err.contains("EnvoyExtensionPolicy"), "{err}");
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, policy("127.0.0.1:1/x:v1")).expect("policy");
    let (ok, _, err) = run(&["render", s(&policy_file), "--cache-dir", s(&missing)]).await;
    let index = missing.join("index.json");
    assert!(!ok && err.contains(s(&index)) && err.contains("`serve` or `pull` wrote"), "{err}");
}

/// `serve` speaks TLS unless told otherwise by name, refuses to start with a pair it cannot
/// use, and, serving, refuses a broken replacement with a log line saying the old pair stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_needs_tls_or_plain_http_and_logs_a_refused_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").to_string();
    let serve_args = ["serve", "--cache-dir", s(&cache), "--listen", &listen];
    let (ok, _, err) = run(&serve_args).await;
    assert!(!ok && err.contains("--tls-cert") && err.contains("--plain-http"), "{err}");

    let ca = common::TestCa::new(dir.path(), "rotation");
    let (crt, key) = ca.leaf();
    let mut volume = common::SecretVolume::new(&dir.path().join("tls"));
    volume.project(&[("tls.crt", b"not a certificate"), ("tls.key", &key)]);
    let (crt_path, key_path) = (volume.path("tls.crt"), volume.path("tls.key"));
    let tls_args = ["--tls-cert", s(&crt_path), "--tls-key", s(&key_path), "--tls-reload-seconds", "1"];
    let (ok, _, err) = run(&[&serve_args[..], &tls_args[..]].concat()).await;
    assert!(!ok && err.contains(s(&crt_path)) && err.contains("no PEM certificate"), "{err}");

    volume.project(&[("tls.crt", &crt), ("tls.key", &key)]);
    let mut serve = Command::new(BIN)
        .args(serve_args)
        .args(tls_args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = serve.stderr.take().expect("stderr");
    let collected = std::sync::Arc::clone(&log);
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            collected.lock().expect("log").push_str(&format!("{line}\n"));
        }
    });
    let https = common::https_client(&ca.cert);
    let url = format!("https://localhost:{}/healthz", listen.rsplit(':').next().expect("port"));
    assert!(harness::eventually(Duration::from_secs(60), || common::get_ok(&https, &url)).await, "not serving");

    // Another CA's pair, with the key of the pair in use: not a pair.
    let other = common::TestCa::new(dir.path(), "other");
    let (other_crt, _) = other.leaf();
    volume.project(&[("tls.crt", &other_crt), ("tls.key", &key)]);
    let logged = harness::eventually(Duration::from_secs(60), || async {
        log.lock().expect("log").contains("still serving the previous pair")
    })
    .await;
    let text = log.lock().expect("log").clone();
    assert!(logged && text.contains("not a pair"), "no clear log of the refused pair:\n{text}");
    assert!(common::get_ok(&https, &url).await, "the pair in use must stay after a refused replacement");
    assert!(serve.try_wait().expect("status").is_none(), "serve exited");
}
