//! registry-cache under faults and load, against a real private registry (Debian's
//! `docker-registry` on loopback) behind a fault-injecting proxy, with the `registry-cache`
//! binary as users run it:
//!
//! - slow, stalled, failing and lying upstreams: clear errors, nothing half-cached, what is
//!   cached still served;
//! - a full disk: a clear error, earlier entries kept and served, the space given back;
//! - `kill -9` at many points of pulls and writes: no corrupt entry, no lost signed artifact;
//! - 200 concurrent clients: no error, every byte right.
//!
//! `cargo test -p registry-cache --test faults --test abuse -- --test-threads 2 --nocapture`
//! prints the figures recorded in docs/reliability.md.

mod common;

use common::{auth, bin, docker_config, files_in, push, referenced_blobs, run, wasm_module, Fault, Proxy};
use registry_cache::artifact::{digest_hex, sha256_hex, Format};
use registry_cache::cache::Cache;
use registry_cache::publish;
use registry_cache::pull::Pulled;
use registry_cache::server::{AccessCheck, Permissions};
use registry_cache::sign::{self, PublicKey, SigningKey};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cache in `dir` after a restart: every entry's blobs verify, nothing unreferenced is left,
/// `tmp/` is empty. Returns the references.
fn reopen_and_check(dir: &Path) -> Vec<String> {
    let cache = Cache::open(dir, 1 << 30).expect("the cache opens after the fault");
    for e in cache.entries() {
        for digest in [&e.module, &e.manifest, &e.config].into_iter().chain(&e.signature).chain(&e.extra_blobs) {
            assert!(
                matches!(cache.get_blob(digest), Ok(Some(_))),
                "{}: blob {digest} missing or corrupt after the fault",
                e.reference
            );
        }
    }
    assert_eq!(common::blob_digests(dir), referenced_blobs(&cache), "blobs no entry refers to were left");
    assert!(files_in(dir, "tmp").is_empty(), "tmp/ not emptied: {:?}", files_in(dir, "tmp"));
    cache.entries().into_iter().map(|e| e.reference).collect()
}

struct Pull<'a> {
    cache_dir: &'a Path,
    auth_file: &'a Path,
    proxy: SocketAddr,
}

impl Pull<'_> {
    fn command(&self, image: &str, extra: &[&str]) -> tokio::process::Command {
        let mut cmd = bin();
        cmd.arg("pull").arg(image).arg("--cache-dir").arg(self.cache_dir).arg("--auth").arg(self.auth_file);
        cmd.args(["--insecure-registry", &self.proxy.to_string()]).args(extra);
        cmd
    }
}

fn write_auth(dir: &Path, proxy: SocketAddr) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, docker_config(proxy)).expect("config.json");
    path
}

#[tokio::test]
async fn a_slow_upstream_completes_and_a_stalled_one_times_out_with_nothing_half_cached() {
    let registry = common::registry().await;
    let proxy = Proxy::start(registry.addr).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = tempfile::tempdir().expect("tempdir");
    let auth_file = write_auth(conf.path(), proxy.addr);
    let pull = Pull { cache_dir: dir.path(), auth_file: &auth_file, proxy: proxy.addr };
    let slow = wasm_module("slow", 256 << 10);
    push(registry.addr, "wasm/slow", &slow).await;
    push(registry.addr, "wasm/stalled", &wasm_module("stalled", 256 << 10)).await;
    let image = |repo: &str| format!("{}/{repo}:v1", proxy.addr);

    // Slow but steady: 16 chunks of 16 KiB, 40 ms apart.
    proxy.set(Fault::Slow { chunk: 16 << 10, delay: Duration::from_millis(40) });
    let r = run(&mut pull.command(&image("wasm/slow"), &["--read-timeout-seconds", "2"])).await;
    assert!(r.ok, "a slow but steady upstream: {}", r.stderr);
    assert!(r.elapsed >= Duration::from_millis(640), "the injected delay did not apply: {:?}", r.elapsed);
    eprintln!("fault slow (256 KiB in 16 KiB chunks 40 ms apart): pulled in {:?}", r.elapsed);
    let before = reopen_and_check(dir.path());
    assert_eq!(before, vec![image("wasm/slow")]);

    // Stalled mid-body: the read timeout fails the pull, whatever the registry does next.
    proxy.set(Fault::Stall { after: 64 << 10 });
    let r = run(&mut pull.command(&image("wasm/stalled"), &["--read-timeout-seconds", "1"])).await;
    eprintln!("fault stall after 64 KiB (read timeout 1 s): failed in {:?}: {}", r.elapsed, r.stderr.trim());
    assert!(!r.ok, "a stalled pull succeeded");
    assert!(r.stderr.contains("timed out"), "no clear error: {}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(15), "the stalled pull took {:?}", r.elapsed);
    assert!(files_in(dir.path(), "tmp").is_empty(), "the failed pull left temp files");
    assert_eq!(reopen_and_check(dir.path()), before, "the stalled pull changed the cache");

    // Steady but too slow in all: the pull deadline fails it.
    proxy.set(Fault::Slow { chunk: 16 << 10, delay: Duration::from_millis(150) });
    let r = run(&mut pull.command(&image("wasm/stalled"), &["--pull-timeout-seconds", "1"])).await;
    eprintln!("fault slow (150 ms per 16 KiB, pull deadline 1 s): failed in {:?}: {}", r.elapsed, r.stderr.trim());
    assert!(!r.ok && r.stderr.contains("timed out after"), "no clear error: {}", r.stderr);
    assert_eq!(reopen_and_check(dir.path()), before, "the timed-out pull changed the cache");

    // The same image pulls once the upstream recovers.
    proxy.set(Fault::None);
    let r = run(&mut pull.command(&image("wasm/stalled"), &[])).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(reopen_and_check(dir.path()).len(), 2);
}

#[tokio::test]
async fn a_failing_upstream_gives_clear_errors_caches_nothing_and_the_cache_still_serves() {
    let registry = common::registry().await;
    let proxy = Proxy::start(registry.addr).await;
    let cached = wasm_module("cached", 64 << 10);
    let public = wasm_module("public", 64 << 10);
    push(registry.addr, "wasm/cached", &cached).await;
    push(registry.addr, "wasm/public", &public).await;
    push(registry.addr, "wasm/new", &wasm_module("new", 64 << 10)).await;
    let image = |repo: &str| format!("{}/{repo}:v1", proxy.addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let puller = common::puller(proxy.addr, Duration::from_secs(2));
    let private_entry =
        publish::publish(&cache, &puller.pull(&image("wasm/cached"), &auth()).await.expect("pull"), true)
            .expect("publish");
    let public_entry =
        publish::publish(&cache, &puller.pull(&image("wasm/public"), &auth()).await.expect("pull"), false)
            .expect("publish");
    let permissions = Permissions::new(
        Duration::from_secs(600),
        common::access_check(common::puller(proxy.addr, Duration::from_secs(2))),
    );
    let addr = common::serve(common::serve_state(Arc::clone(&cache), permissions)).await;
    let http = reqwest::Client::new();

    // What a client with proof of access, and an anonymous one for the public artifact, get.
    let served = || async {
        let mut bodies = vec![];
        for (path, creds, digest) in [
            (format!("/v2/{}/manifests/v1", common::served(&private_entry)), true, private_entry.manifest.clone()),
            (
                format!("/v2/{}/blobs/{}", common::served(&private_entry), private_entry.module),
                true,
                private_entry.module.clone(),
            ),
            (
                format!("/wasm/{}.wasm", digest_hex(&private_entry.module).unwrap_or_default()),
                true,
                private_entry.module.clone(),
            ),
            (
                format!("/wasm/{}.wasm", digest_hex(&public_entry.module).unwrap_or_default()),
                false,
                public_entry.module.clone(),
            ),
            (format!("/v2/{}/manifests/v1", common::served(&public_entry)), false, public_entry.manifest.clone()),
        ] {
            let mut request = http.get(format!("http://{addr}{path}"));
            if creds {
                request = request.basic_auth(common::USER, Some(common::PASSWORD));
            }
            let r = request.send().await.expect("request");
            assert_eq!(r.status(), 200, "{path}");
            let body = r.bytes().await.expect("body");
            assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest, "{path}");
            bodies.push(body.len());
        }
        bodies.len()
    };
    assert_eq!(served().await, 5);
    let blobs_before = common::blob_digests(dir.path());

    for (fault, what) in [
        (Fault::Unavailable, "503 on every request"),
        (Fault::ResetBlob { after: 16 << 10 }, "connection dropped after 16 KiB of the blob"),
    ] {
        proxy.set(fault);
        let err = puller.pull(&image("wasm/new"), &auth()).await.err().map(|e| e.to_string()).unwrap_or_default();
        eprintln!("fault {what}: pull refused: {err}");
        assert!(err.starts_with("registry: "), "no clear error: {err:?}");
        assert!(cache.lookup(&image("wasm/new")).is_none());
        assert_eq!(common::blob_digests(dir.path()), blobs_before, "the failed pull left blobs");
        assert!(files_in(dir.path(), "tmp").is_empty());
        assert_eq!(served().await, 5, "cached artifacts must be served while the upstream fails");
        // Credentials the upstream has not vouched for are refused while it cannot be asked.
        let guess = http
            .get(format!("http://{addr}/v2/{}/manifests/v1", common::served(&private_entry)))
            .basic_auth(common::USER, Some("guess"))
            .send()
            .await
            .expect("request");
        assert_eq!(guess.status(), 404, "unproven credentials were served during the outage");
    }

    // The registry itself gone: the proxy cannot connect.
    proxy.set(Fault::None);
    drop(registry);
    let err = puller.pull(&image("wasm/new"), &auth()).await.err().map(|e| e.to_string()).unwrap_or_default();
    eprintln!("fault registry down: pull refused: {err}");
    assert!(err.starts_with("registry: "), "{err}");
    assert_eq!(served().await, 5, "cached artifacts must be served while the upstream is down");
    assert_eq!(common::blob_digests(dir.path()), blobs_before);
    drop(cache);
    assert_eq!(reopen_and_check(dir.path()).len(), 2);
}

#[tokio::test]
async fn wrong_digests_are_refused_and_nothing_is_cached() {
    let registry = common::registry().await;
    let proxy = Proxy::start(registry.addr).await;
    let conf = tempfile::tempdir().expect("tempdir");
    let auth_file = write_auth(conf.path(), proxy.addr);
    let module = wasm_module("lied-about", 32 << 10);
    push(registry.addr, "wasm/lied-about", &module).await;
    let image = format!("{}/wasm/lied-about:v1", proxy.addr);
    let real = format!("sha256:{}", sha256_hex(&module));
    let fake = format!("sha256:{}", sha256_hex(b"some other blob"));
    // The manifest digest, to pin the pull by it.
    let manifest_digest = common::puller(proxy.addr, Duration::from_secs(2))
        .pull(&image, &auth())
        .await
        .expect("a faithful proxy")
        .upstream_digest;
    let pinned = format!("{}/wasm/lied-about@{manifest_digest}", proxy.addr);

    for (fault, what, target) in [
        (Fault::FlipBlob, "one byte of the blob flipped", &image),
        (
            Fault::ManifestLayerDigest { real: real.clone(), fake: fake.clone() },
            "manifest names another layer digest",
            &image,
        ),
        (
            Fault::ManifestLayerDigest { real: real.clone(), fake: fake.clone() },
            "manifest altered under a pinned digest",
            &pinned,
        ),
    ] {
        proxy.set(fault);
        let dir = tempfile::tempdir().expect("tempdir");
        let pull = Pull { cache_dir: dir.path(), auth_file: &auth_file, proxy: proxy.addr };
        let r = run(&mut pull.command(target, &[])).await;
        eprintln!("fault {what}: pull refused: {}", r.stderr.trim());
        assert!(!r.ok, "{what}: accepted");
        assert!(r.stderr.to_lowercase().contains("digest"), "{what}: no digest mismatch named: {}", r.stderr);
        assert!(files_in(dir.path(), "tmp").is_empty(), "{what}: temp files left");
        assert!(common::blob_digests(dir.path()).is_empty(), "{what}: blobs left");
        assert!(reopen_and_check(dir.path()).is_empty(), "{what}: an entry was recorded");
    }
    // The control: the same pull through a faithful proxy is cached.
    proxy.set(Fault::None);
    let dir = tempfile::tempdir().expect("tempdir");
    let r =
        run(&mut Pull { cache_dir: dir.path(), auth_file: &auth_file, proxy: proxy.addr }.command(&pinned, &[])).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(reopen_and_check(dir.path()).len(), 1);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped; None when mounting
/// is not permitted here.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn key_pair(dir: &Path) -> (PathBuf, PathBuf, PublicKey) {
    let key = SigningKey::generate().expect("key");
    let (private, public) = (dir.join("cache.key"), dir.join("cache.pub"));
    std::fs::write(&private, key.to_pkcs8_pem().expect("pem")).expect("write key");
    std::fs::write(&public, key.public_key().to_pem()).expect("write pub");
    (private, public, key.public_key())
}

#[tokio::test]
async fn a_full_disk_fails_the_pull_clearly_and_keeps_what_was_cached() {
    let registry = common::registry().await;
    let conf = tempfile::tempdir().expect("tempdir");
    let auth_file = write_auth(conf.path(), registry.addr);
    let (key_file, _, public) = key_pair(conf.path());
    let small = wasm_module("small", 16 << 10);
    push(registry.addr, "wasm/small", &small).await;
    push(registry.addr, "wasm/big", &wasm_module("big", 1536 << 10)).await;
    push(registry.addr, "wasm/after", &wasm_module("after", 16 << 10)).await;
    let image = |repo: &str| format!("{}/{repo}:v1", registry.addr);

    // A real small filesystem if this process may mount one; else a file size limit on the
    // pulling process, which fails its writes with EFBIG instead of ENOSPC.
    let tmpfs = Tmpfs::mount("1m");
    let fallback = tempfile::tempdir().expect("tempdir");
    let dir = tmpfs.as_ref().map_or(fallback.path(), |t| t.dir.path()).to_path_buf();
    let pull = |repo: &str| {
        let mut cmd = match tmpfs {
            Some(_) => bin(),
            None => {
                let mut sh = tokio::process::Command::new("sh");
                sh.args(["-c", "trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\""]);
                sh.arg(env!("CARGO_BIN_EXE_registry-cache")).env("RUST_BACKTRACE", "0").kill_on_drop(true);
                sh
            }
        };
        cmd.arg("pull").arg(image(repo)).arg("--cache-dir").arg(&dir).arg("--auth").arg(&auth_file);
        cmd.args(["--insecure-registry", &registry.addr.to_string()]).arg("--signing-key").arg(&key_file);
        cmd
    };
    let how = if tmpfs.is_some() { "tmpfs of 1 MiB" } else { "RLIMIT_FSIZE of 512 KiB" };
    let r = run(&mut pull("wasm/small")).await;
    assert!(r.ok, "{}", r.stderr);

    let r = run(&mut pull("wasm/big")).await;
    eprintln!("fault disk full ({how}), 1.5 MiB module: pull refused: {}", r.stderr.trim());
    assert!(!r.ok, "a module larger than the disk was cached");
    assert!(
        r.stderr.contains("No space left on device") || r.stderr.contains("File too large"),
        "the error does not name the disk problem: {}",
        r.stderr
    );
    assert!(files_in(&dir, "tmp").is_empty(), "the failed write left its temp file: {:?}", files_in(&dir, "tmp"));
    assert_eq!(reopen_and_check(&dir), vec![image("wasm/small")]);
    {
        let cache = Cache::open(&dir, 1 << 30).expect("cache");
        sign::verify_entry(&cache, &image("wasm/small"), std::slice::from_ref(&public))
            .expect("the earlier entry still verifies");
    }
    // The space the failed write took was given back: the next pull fits.
    let r = run(&mut pull("wasm/after")).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(reopen_and_check(&dir).len(), 2);

    // The earlier entries are served from the full disk.
    let cache = Arc::new(Cache::open(&dir, 1 << 30).expect("cache"));
    let permissions = Permissions::new(
        Duration::from_secs(600),
        common::access_check(common::puller(registry.addr, Duration::from_secs(5))),
    );
    let addr = common::serve(common::serve_state(Arc::clone(&cache), permissions)).await;
    let url = format!("http://{addr}/wasm/{}.wasm", sha256_hex(&small));
    let r = reqwest::Client::new().get(url).basic_auth(common::USER, Some(common::PASSWORD)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), &small[..]);

    // In-process, the regression: a write that fails on a full disk removes its temp file, or
    // the space stays taken until the next restart and every later write fails too.
    if tmpfs.is_some() {
        let err = cache.put_blob(&vec![7u8; 2 << 20]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("No space left on device"), "{err}");
        assert!(files_in(&dir, "tmp").is_empty(), "a failed write left {:?}", files_in(&dir, "tmp"));
        cache.put_blob(&wasm_module("fits", 64 << 10)).expect("the disk has room again after a failed write");
    }
}

#[tokio::test]
async fn kill_9_during_pulls_and_writes_leaves_no_corrupt_entry_and_loses_no_signed_artifact() {
    let registry = common::registry().await;
    let proxy = Proxy::start(registry.addr).await;
    let conf = tempfile::tempdir().expect("tempdir");
    let auth_file = write_auth(conf.path(), proxy.addr);
    let (key_file, pub_file, public) = key_pair(conf.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let key_arg = key_file.to_string_lossy().into_owned();
    let pull = Pull { cache_dir: dir.path(), auth_file: &auth_file, proxy: proxy.addr };
    let image = |repo: &str| format!("{}/{repo}:v1", proxy.addr);
    const FRACTIONS: [f64; 14] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.85, 0.92, 1.0, 1.1, 1.25, 1.5];
    for repo in ["wasm/base-0", "wasm/base-1", "wasm/measure"] {
        push(registry.addr, repo, &wasm_module(repo, 512 << 10)).await;
    }
    for i in 0..FRACTIONS.len() {
        let repo = format!("wasm/victim-{i}");
        push(registry.addr, &repo, &wasm_module(&repo, 512 << 10)).await;
    }

    // Earlier signed entries, which no crash may take away.
    let mut must_keep = vec![];
    for repo in ["wasm/base-0", "wasm/base-1"] {
        let r = run(&mut pull.command(&image(repo), &["--signing-key", &key_arg])).await;
        assert!(r.ok, "{}", r.stderr);
        must_keep.push(image(repo));
    }
    // How long one slow pull takes whole, to kill the next ones at points along it.
    proxy.set(Fault::Slow { chunk: 32 << 10, delay: Duration::from_millis(15) });
    let r = run(&mut pull.command(&image("wasm/measure"), &["--signing-key", &key_arg])).await;
    assert!(r.ok, "{}", r.stderr);
    must_keep.push(image("wasm/measure"));
    let whole = r.elapsed;

    let (mut killed, mut finished, mut leftovers) = (0, 0, 0);
    for (i, fraction) in FRACTIONS.iter().enumerate() {
        let victim = image(&format!("wasm/victim-{i}"));
        let mut cmd = pull.command(&victim, &["--signing-key", &key_arg]);
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        tokio::time::sleep(whole.mul_f64(*fraction)).await;
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                assert!(status.success(), "{victim}: the pull failed by itself");
                finished += 1;
                must_keep.push(victim.clone());
            }
            None => {
                child.kill().await.expect("SIGKILL");
                killed += 1;
            }
        }
        leftovers += files_in(dir.path(), "tmp").len();
        let present = reopen_and_check(dir.path());
        for kept in &must_keep {
            assert!(present.contains(kept), "{kept} was lost after killing the pull of {victim}");
        }
        let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
        for reference in &present {
            sign::verify_entry(&cache, reference, std::slice::from_ref(&public))
                .unwrap_or_else(|e| panic!("{reference} after killing at {fraction}: {e}"));
        }
        // A victim the kill caught after its entry was recorded counts as kept from now on.
        if present.contains(&victim) && !must_keep.contains(&victim) {
            must_keep.push(victim);
        }
    }
    eprintln!(
        "fault kill -9: one slow pull takes {whole:?}; {} pulls killed at 0-150% of that: {killed} killed, \
         {finished} had finished; {leftovers} temp files found after kills, all removed on reopen; \
         {} signed entries kept, every one verified",
        FRACTIONS.len(),
        must_keep.len()
    );
    assert!(killed >= 4, "too few pulls were caught mid-way ({killed}); the slow proxy is not slowing them");

    // And the binary's own verification agrees.
    let r = run(bin().arg("verify").arg("--cache-dir").arg(dir.path()).arg("--key").arg(&pub_file)).await;
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    for kept in &must_keep {
        assert!(r.stdout.contains(&format!("{kept} verified")), "{kept}: {}", r.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_get_every_byte_right() {
    const CLIENTS: usize = 200;
    const ROUNDS: usize = 5;
    const ARTIFACTS: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let mut entries = vec![];
    for i in 0..ARTIFACTS {
        let module = wasm_module(&format!("load-{i}"), 32 << 10);
        let pulled = Pulled {
            reference: format!("registry.test:5000/load/m{i}:v1"),
            upstream_digest: format!("sha256:{}", sha256_hex(format!("upstream {i}").as_bytes())),
            format: Format::SoloOci,
            module,
            verified_by: vec![],
        };
        entries.push(publish::publish(&cache, &pulled, false).expect("publish"));
    }
    let never: AccessCheck = Arc::new(|_, _| Box::pin(async { Ok(false) }));
    let addr = common::serve(common::serve_state(cache, Permissions::new(Duration::from_secs(60), never))).await;
    let entries = Arc::new(entries);

    let started = Instant::now();
    let mut tasks = vec![];
    for client in 0..CLIENTS {
        let entries = Arc::clone(&entries);
        tasks.push(tokio::spawn(async move {
            // Half the clients all want the same artifact; the others spread over all of them.
            let http = reqwest::Client::new();
            let (mut latencies, mut errors) = (vec![], vec![]);
            for round in 0..ROUNDS {
                let i = if client % 2 == 0 { 0 } else { (client + round) % ARTIFACTS };
                let e = &entries[i];
                for (path, digest) in [
                    (format!("/v2/{}/manifests/v1", common::served(e)), &e.manifest),
                    (format!("/v2/{}/blobs/{}", common::served(e), e.module), &e.module),
                    (format!("/wasm/{}.wasm", digest_hex(&e.module).unwrap_or_default()), &e.module),
                ] {
                    let t = Instant::now();
                    let outcome = match http.get(format!("http://{addr}{path}")).send().await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(body) if format!("sha256:{}", sha256_hex(&body)) == *digest => Ok(()),
                            Ok(_) => Err(format!("{path}: body does not match {digest}")),
                            Err(e) => Err(format!("{path}: {e}")),
                        },
                        Ok(r) => Err(format!("{path}: {}", r.status())),
                        Err(e) => Err(format!("{path}: {e}")),
                    };
                    latencies.push(t.elapsed());
                    if let Err(e) = outcome {
                        errors.push(e);
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (vec![], vec![]);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "load: {CLIENTS} concurrent clients, {} requests (manifest, blob, /wasm; 32 KiB modules, {ARTIFACTS} artifacts, \
         half the clients on one), {} errors, {elapsed:?}, {:.0} requests/s, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        errors.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.50),
        at(0.99),
        at(1.0),
    );
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert_eq!(latencies.len(), CLIENTS * ROUNDS * 3);
}
