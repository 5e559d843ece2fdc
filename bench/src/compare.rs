//! Two gateways side by side on the same pods, loaded in short slices, in turn or at once: a
//! cost comparison that the host's drifting speed (other tenants, frequency) affects less than
//! separate runs minutes apart, since each pair of slices sees about the same machine.
//! Saturated (a closed loop) it compares throughput; at a fixed rate, latency.

use crate::load::{self, Recorder};
use crate::pods::{Deployment, Protocol, Termination};
use crate::scenario::{cpu_us, start_gateway, Load, Scenario};
use crate::variants::Variant;
use hdrhistogram::Histogram;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What one gateway served in one slice, or over all of them.
#[derive(Debug, Clone)]
pub struct Served {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    pub envoy_cpu_us: f64,
    pub latency_us: Histogram<u64>,
}

impl Default for Served {
    fn default() -> Self {
        Self { ok: 0, failed: 0, seconds: 0.0, envoy_cpu_us: 0.0, latency_us: load::latency_histogram() }
    }
}

impl Served {
    pub fn ok_per_second(&self) -> f64 {
        self.ok as f64 / self.seconds.max(f64::EPSILON)
    }

    pub fn envoy_cpu_us_per_request(&self) -> f64 {
        self.envoy_cpu_us / (self.ok + self.failed).max(1) as f64
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }

    pub fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.5) as f64 / 1000.0
    }
}

#[derive(Debug, Clone)]
pub struct Comparison {
    pub base: (Variant, Served),
    pub other: (Variant, Served),
    /// `other`'s throughput over `base`'s, slice pair by slice pair.
    pub ratios: Vec<f64>,
    /// `other`'s Envoy CPU per request less `base`'s, slice pair by slice pair.
    pub extra_cpu_us: Vec<f64>,
    /// The same, as a share of `base`'s.
    pub extra_cpu_share: Vec<f64>,
    /// `other`'s p99 and p50 less `base`'s, in ms, slice pair by slice pair.
    pub extra_p99_ms: Vec<f64>,
    pub extra_p50_ms: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Comparison {
    pub fn median_ratio(&self) -> f64 {
        median(&self.ratios)
    }

    pub fn median_extra_cpu_us(&self) -> f64 {
        median(&self.extra_cpu_us)
    }

    /// The extra CPU per request as a share of `base`'s, pair by pair: less sensitive than
    /// microseconds to the host's speed, which scales both.
    pub fn median_extra_cpu_share(&self) -> f64 {
        median(&self.extra_cpu_share)
    }

    pub fn median_extra_p99_ms(&self) -> f64 {
        median(&self.extra_p99_ms)
    }

    pub fn median_extra_p50_ms(&self) -> f64 {
        median(&self.extra_p50_ms)
    }
}

async fn slice(url: &str, load: Load, length: Duration, envoy_pid: u32) -> Served {
    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let cpu_before = cpu_us(envoy_pid);
    let (url, stopped, recorded) = (url.to_string(), Arc::clone(&stop), Arc::clone(&recorder));
    let load = match load {
        Load::Closed { concurrency } => tokio::spawn(load::closed_loop(url, concurrency, start, stopped, recorded)),
        Load::Open { rate } => tokio::spawn(load::open_loop(url, rate, start, stopped, recorded)),
    };
    tokio::time::sleep(length).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(cpu_us(envoy_pid)).map_or(0.0, |(b, a)| a - b);
    let mut served = Served { seconds, envoy_cpu_us: cpu, ..Served::default() };
    for s in recorder.snapshot() {
        served.ok += s.ok;
        served.failed += s.failed_total();
        let _ = served.latency_us.add(&s.latency_us);
    }
    served
}

fn add(total: &mut Served, s: &Served) {
    total.ok += s.ok;
    total.failed += s.failed;
    total.seconds += s.seconds;
    total.envoy_cpu_us += s.envoy_cpu_us;
    let _ = total.latency_us.add(&s.latency_us);
}

/// Loads `base` and `other` with `scenario`'s load, on its pods without churn, in turn, `pairs`
/// times per round, `length` each; the order within a pair alternates so neither always goes
/// first. `simultaneous` loads both at once instead, each with half the clients of a closed loop
/// or the full rate of an open one: both then see the very same machine.
///
/// Each of the `rounds` starts both gateways afresh, in alternating order: of two identical
/// Envoys, one can serve several percent more than the other for as long as both run (a no-op
/// against itself measured 0.90 to 1.08 over 10 pairs), so pairs from one pair of processes
/// share a bias that only more processes average out.
pub async fn compare(
    scenario: &Scenario,
    base: Variant,
    other: Variant,
    rounds: usize,
    pairs: usize,
    length: Duration,
    simultaneous: bool,
) -> anyhow::Result<Comparison> {
    let load = scenario.load;
    let shared = match load {
        Load::Closed { concurrency } => Load::Closed { concurrency: (concurrency / 2).max(1) },
        open => open,
    };
    let deployment = Deployment::start(scenario.replicas, Termination::Graceful, Protocol::Http).await?;
    let mut c = Comparison {
        base: (base, Served::default()),
        other: (other, Served::default()),
        ratios: Vec::new(),
        extra_cpu_us: Vec::new(),
        extra_cpu_share: Vec::new(),
        extra_p99_ms: Vec::new(),
        extra_p50_ms: Vec::new(),
    };
    for round in 0..rounds.max(1) {
        let odd = round % 2 == 1;
        let first = start_gateway(scenario, if odd { other } else { base }, None, &deployment).await?;
        let second = start_gateway(scenario, if odd { base } else { other }, None, &deployment).await?;
        let ((lab_a, _service_a), (lab_b, _service_b)) = if odd { (second, first) } else { (first, second) };
        let gateways = [(lab_a.url("/"), lab_a.envoy.pid()), (lab_b.url("/"), lab_b.envoy.pid())];
        for (url, pid) in &gateways {
            slice(url, load, Duration::from_secs(2), *pid).await;
        }
        for i in 0..pairs {
            let [ga, gb] = &gateways;
            let [sa, sb] = if simultaneous {
                let (sa, sb) = tokio::join!(slice(&ga.0, shared, length, ga.1), slice(&gb.0, shared, length, gb.1));
                [sa, sb]
            } else if i % 2 == 0 {
                let sa = slice(&ga.0, load, length, ga.1).await;
                [sa, slice(&gb.0, load, length, gb.1).await]
            } else {
                let sb = slice(&gb.0, load, length, gb.1).await;
                [slice(&ga.0, load, length, ga.1).await, sb]
            };
            c.ratios.push(sb.ok_per_second() / sa.ok_per_second().max(f64::EPSILON));
            let extra = sb.envoy_cpu_us_per_request() - sa.envoy_cpu_us_per_request();
            c.extra_cpu_us.push(extra);
            c.extra_cpu_share.push(extra / sa.envoy_cpu_us_per_request().max(f64::EPSILON));
            c.extra_p99_ms.push(sb.p99_ms() - sa.p99_ms());
            c.extra_p50_ms.push(sb.p50_ms() - sa.p50_ms());
            eprintln!(
                "  round {round} pair {i:>2}: {} {:>8.0}/s {:>6.1} µs p99 {:>6.2} ms   {} {:>8.0}/s {:>6.1} µs p99 {:>6.2} ms   ratio {:.3}",
                base.name(),
                sa.ok_per_second(),
                sa.envoy_cpu_us_per_request(),
                sa.p99_ms(),
                other.name(),
                sb.ok_per_second(),
                sb.envoy_cpu_us_per_request(),
                sb.p99_ms(),
                c.ratios.last().copied().unwrap_or(f64::NAN)
            );
            add(&mut c.base.1, &sa);
            add(&mut c.other.1, &sb);
        }
    }
    Ok(c)
}
