//! One scenario run against one configuration: pods, a lagging control plane, real Envoy,
//! load, and a rolling restart in the middle.

use crate::control_plane::ControlPlane;
use crate::load::{self, Recorder, Second};
use crate::pods::{Deployment, Protocol, RolloutSpec, Termination};
use crate::service::{ServiceProxy, KUBE_PROXY_DELAY};
use crate::variants::Variant;
use anyhow::Context as _;
use harness::gateway::{FilterSpec, GatewaySpec, FALLBACK, PRIMARY};
use harness::Lab;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Fixed request rate, whatever the answers take.
    Open { rate: u32 },
    /// This many clients sending back to back.
    Closed { concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub replicas: usize,
    pub termination: Termination,
    /// None: steady state for `steady_for`.
    pub rollout: Option<RolloutSpec>,
    pub lag: Duration,
    pub batch: Duration,
    pub load: Load,
    pub warmup: Duration,
    /// After the rollout and the lag, keep measuring this long.
    pub settle: Duration,
    pub steady_for: Duration,
    /// Per-try timeout for the configurations that retry on other endpoints (see `Variant`).
    pub per_try_timeout: Option<Duration>,
    /// Cluster connect timeout for every configuration (None: Envoy Gateway's 10 s).
    pub connect_timeout: Option<Duration>,
    /// Timeouts a user would tune, for the configurations that take them
    /// (`Variant::takes_tuned_timeouts`) instead of the two above.
    pub tuned_timeouts: Option<Timeouts>,
    /// What the pods serve and the load sends.
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// BackendTrafficPolicy `timeout.tcp.connectTimeout`.
    pub connect: Duration,
    /// BackendTrafficPolicy `retry.perRetry.timeout`, or churn-guard's `retry.perTryTimeoutMs`.
    pub per_try: Duration,
}

impl Scenario {
    /// (connect timeout, per-try timeout) for `variant`.
    pub fn timeouts(&self, variant: Variant) -> (Option<Duration>, Option<Duration>) {
        match self.tuned_timeouts {
            Some(t) if variant.takes_tuned_timeouts() => (Some(t.connect), Some(t.per_try)),
            _ => (self.connect_timeout, self.per_try_timeout),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub variant: &'static str,
    pub seconds: Vec<Second>,
    /// Seconds since the start: rollout start, rollout end, and when Envoy's view caught up.
    pub rollout: Option<(f64, f64, f64)>,
    /// Envoy's CPU time (user + system, all threads) per request sent after warm-up: what the
    /// proxy spends, apart from the load generator and upstreams sharing the machine.
    pub envoy_cpu_us_per_request: Option<f64>,
    /// What happened inside Envoy over the run, from its stats.
    pub inside: Inside,
}

/// Envoy's own account of a run: how the configuration got its result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inside {
    /// Retries Envoy performed, on the endpoints and on the Service path.
    pub retries: u64,
    /// Requests (attempts) sent through the Service path.
    pub via_service: u64,
    /// Requests churn-guard steered with the override header.
    pub steered: u64,
    /// Ejections churn-guard decided.
    pub ejections: u64,
}

async fn inside(lab: &Lab) -> Inside {
    let stats = lab.envoy.stats().await.unwrap_or_default();
    let stat = |k: String| stats.get(&k).copied().unwrap_or(0);
    Inside {
        retries: stat(format!("cluster.{PRIMARY}.upstream_rq_retry"))
            + stat(format!("cluster.{FALLBACK}.upstream_rq_retry")),
        via_service: stat(format!("cluster.{FALLBACK}.upstream_rq_total")),
        steered: stat("wasmcustom.churn_guard.steered".into()),
        ejections: stat("wasmcustom.churn_guard.ejections".into()),
    }
}

/// CPU time a process has used so far, in microseconds.
pub(crate) fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1e6 / hz.max(1.0))
}

pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

pub async fn run(scenario: &Scenario, variant: Variant, progress: Progress<'_>) -> anyhow::Result<RunResult> {
    run_with(scenario, variant, None, progress).await
}

/// A gateway configured from outside the lab, as Envoy Gateway would configure it from a set of
/// resources, with the filter loaded from where they say.
#[derive(Debug, Clone)]
pub struct Configured {
    pub spec: GatewaySpec,
    pub filter: FilterSpec,
}

/// As `run`, with the gateway `configured` instead of the variant's own set-up; the variant
/// only names the run.
pub async fn run_with(
    scenario: &Scenario,
    variant: Variant,
    configured: Option<&Configured>,
    progress: Progress<'_>,
) -> anyhow::Result<RunResult> {
    let mut deployment = Deployment::start(scenario.replicas, scenario.termination, scenario.protocol).await?;
    let (lab, service) = start_gateway(scenario, variant, configured, &deployment).await?;
    let _control_plane =
        ControlPlane::start(lab.xds.dir.clone(), PRIMARY, deployment.endpoints.clone(), scenario.lag, scenario.batch);

    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let url = lab.url("/");
    let load = match scenario.load {
        Load::Open { rate } if scenario.protocol == Protocol::Grpc => {
            tokio::spawn(load::grpc_open_loop(lab.port, rate, start, Arc::clone(&stop), Arc::clone(&recorder)))
        }
        Load::Open { rate } => {
            tokio::spawn(load::open_loop(url, rate, start, Arc::clone(&stop), Arc::clone(&recorder)))
        }
        Load::Closed { .. } if scenario.protocol == Protocol::Grpc => {
            anyhow::bail!("gRPC load is open loop only (give a rate, not a concurrency)")
        }
        Load::Closed { concurrency } => {
            tokio::spawn(load::closed_loop(url, concurrency, start, Arc::clone(&stop), Arc::clone(&recorder)))
        }
    };
    let reporter = {
        let (recorder, stop) = (Arc::clone(&recorder), Arc::clone(&stop));
        let label = format!("{} {:<22}", scenario.name, variant.name());
        let progress = progress_line(label);
        async move {
            let mut tick = tokio::time::interval_at(start + Duration::from_secs(2), Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let secs = recorder.snapshot();
                let i = start.elapsed().as_secs().saturating_sub(2) as usize;
                if let Some(s) = secs.get(i) {
                    progress(i, s);
                }
            }
        }
    };
    let reporter = tokio::spawn(reporter);

    tokio::time::sleep(scenario.warmup).await;
    let envoy_pid = lab.envoy.pid();
    let cpu_at_warmup = cpu_us(envoy_pid);
    let sent_at_warmup: u64 = recorder.snapshot().iter().map(|s| s.sent).sum();
    let rollout = match &scenario.rollout {
        Some(spec) => {
            let began = start.elapsed().as_secs_f64();
            progress(&format!("rolling restart of {} pods begins", scenario.replicas));
            deployment.rolling_update(spec).await?;
            let ended = start.elapsed().as_secs_f64();
            tokio::time::sleep(scenario.lag + scenario.batch).await;
            let caught_up = start.elapsed().as_secs_f64();
            tokio::time::sleep(scenario.settle).await;
            Some((began, ended, caught_up))
        }
        None => {
            tokio::time::sleep(scenario.steady_for).await;
            None
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let sent: u64 = recorder.snapshot().iter().map(|s| s.sent).sum::<u64>() - sent_at_warmup;
    let envoy_cpu_us_per_request =
        cpu_at_warmup.zip(cpu_us(envoy_pid)).map(|(before, after)| (after - before) / sent.max(1) as f64);
    reporter.abort();
    let inside = inside(&lab).await;
    if let Some(dir) = std::env::var_os("CHURN_LAB_KEEP_LOGS") {
        let _ = std::fs::copy(
            &lab.envoy.log_path,
            std::path::Path::new(&dir).join(format!("{}-{}.log", scenario.name, variant.name())),
        );
    }
    let mut seconds = recorder.snapshot();
    // Sending stopped within the last second: it is partial.
    if seconds.len() > 1 {
        seconds.pop();
    }
    drop(lab);
    drop(service);
    drop(deployment);
    Ok(RunResult {
        scenario: scenario.name.clone(),
        variant: variant.name(),
        seconds,
        rollout,
        envoy_cpu_us_per_request,
        inside,
    })
}

/// Envoy configured as `variant` (or as `configured`) in front of `deployment`'s ready pods,
/// with the Service path when its gateway has a fallback route.
pub async fn start_gateway(
    scenario: &Scenario,
    variant: Variant,
    configured: Option<&Configured>,
    deployment: &Deployment,
) -> anyhow::Result<(Lab, Option<ServiceProxy>)> {
    let (connect_timeout, per_try_timeout) = scenario.timeouts(variant);
    let filter_config = variant.filter_config(per_try_timeout);
    let mut spec = match configured {
        Some(c) => c.spec.clone(),
        None => variant.spec(per_try_timeout),
    };
    spec.connect_timeout = connect_timeout;
    spec.upstream_http2 = scenario.protocol == Protocol::Grpc;
    let service = if spec.fallback.is_some() {
        Some(ServiceProxy::start(deployment.endpoints.clone(), KUBE_PROXY_DELAY).await?)
    } else {
        None
    };
    let ready = deployment.ready_addrs(Instant::now());
    let fallback: Vec<_> = service.iter().map(|s| s.addr).collect();
    let lab = match (configured, variant.module()) {
        (Some(c), _) => Lab::start_with_filter(spec, c.filter.clone(), &ready, &fallback).await?,
        (None, Some(module)) => {
            Lab::start_with_module(
                spec,
                &std::fs::read(&module).with_context(|| {
                    format!("reading Wasm module {} (run `make bench`, which builds it)", module.display())
                })?,
                "{}",
                &ready,
                &fallback,
            )
            .await?
        }
        (None, None) => Lab::start(spec, filter_config.as_deref(), &ready, &fallback).await?,
    };
    Ok((lab, service))
}

fn progress_line(label: String) -> impl Fn(usize, &Second) + Send + Sync {
    move |i, s| {
        let failed = s.failed_total();
        let kinds: Vec<String> = s.failed.iter().take(3).map(|(k, v)| format!("{k}: {v}")).collect();
        eprintln!(
            "  {label} t={i:>3}s  sent {:>5}  ok {:>5}  failed {:>5}{}",
            s.sent,
            s.ok,
            failed,
            if kinds.is_empty() { String::new() } else { format!("  ({})", kinds.join(", ")) }
        );
    }
}
