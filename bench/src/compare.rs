//! Two gateways side by side on the same pods, loaded in short slices, in turn or at once: a
//! cost comparison that the host's drifting speed (other tenants, frequency) affects less than
//! separate runs minutes apart, since each pair of slices sees about the same machine.

use crate::load::{self, Recorder};
use crate::pods::{Deployment, Protocol, Termination};
use crate::scenario::{cpu_us, start_gateway, Scenario};
use crate::variants::Variant;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What one gateway served over all its slices.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub ok: u64,
    pub failed: u64,
    pub seconds: f64,
    pub envoy_cpu_us: f64,
}

impl Served {
    pub fn ok_per_second(&self) -> f64 {
        self.ok as f64 / self.seconds.max(f64::EPSILON)
    }

    pub fn envoy_cpu_us_per_request(&self) -> f64 {
        self.envoy_cpu_us / (self.ok + self.failed).max(1) as f64
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
}

async fn slice(url: &str, concurrency: usize, length: Duration, envoy_pid: u32) -> Served {
    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let cpu_before = cpu_us(envoy_pid);
    let load =
        tokio::spawn(load::closed_loop(url.to_string(), concurrency, start, Arc::clone(&stop), Arc::clone(&recorder)));
    tokio::time::sleep(length).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(cpu_us(envoy_pid)).map_or(0.0, |(b, a)| a - b);
    let secs = recorder.snapshot();
    Served {
        ok: secs.iter().map(|s| s.ok).sum(),
        failed: secs.iter().map(|s| s.failed_total()).sum(),
        seconds,
        envoy_cpu_us: cpu,
    }
}

fn add(total: &mut Served, s: Served) {
    total.ok += s.ok;
    total.failed += s.failed;
    total.seconds += s.seconds;
    total.envoy_cpu_us += s.envoy_cpu_us;
}

/// Saturates `base` and `other`, on `scenario`'s pods without churn, in turn, `pairs` times,
/// `length` each, with `concurrency` clients; the order within a pair alternates so neither
/// always goes first. `simultaneous` loads both at once instead, half the clients each: both
/// then see the very same machine.
pub async fn compare(
    scenario: &Scenario,
    base: Variant,
    other: Variant,
    pairs: usize,
    length: Duration,
    concurrency: usize,
    simultaneous: bool,
) -> anyhow::Result<Comparison> {
    let deployment = Deployment::start(scenario.replicas, Termination::Graceful, Protocol::Http).await?;
    let (lab_a, _service_a) = start_gateway(scenario, base, None, &deployment).await?;
    let (lab_b, _service_b) = start_gateway(scenario, other, None, &deployment).await?;
    let gateways = [(lab_a.url("/"), lab_a.envoy.pid()), (lab_b.url("/"), lab_b.envoy.pid())];
    for (url, pid) in &gateways {
        slice(url, concurrency, Duration::from_secs(2), *pid).await;
    }
    let (mut a, mut b) = (Served::default(), Served::default());
    let (mut ratios, mut extra_cpu_us, mut extra_cpu_share) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let [ga, gb] = &gateways;
        let [sa, sb] = if simultaneous {
            let (sa, sb) =
                tokio::join!(slice(&ga.0, concurrency / 2, length, ga.1), slice(&gb.0, concurrency / 2, length, gb.1));
            [sa, sb]
        } else if i % 2 == 0 {
            let sa = slice(&ga.0, concurrency, length, ga.1).await;
            [sa, slice(&gb.0, concurrency, length, gb.1).await]
        } else {
            let sb = slice(&gb.0, concurrency, length, gb.1).await;
            [slice(&ga.0, concurrency, length, ga.1).await, sb]
        };
        ratios.push(sb.ok_per_second() / sa.ok_per_second().max(f64::EPSILON));
        let extra = sb.envoy_cpu_us_per_request() - sa.envoy_cpu_us_per_request();
        extra_cpu_us.push(extra);
        extra_cpu_share.push(extra / sa.envoy_cpu_us_per_request().max(f64::EPSILON));
        eprintln!(
            "  pair {i:>2}: {} {:>8.0}/s {:>6.1} µs   {} {:>8.0}/s {:>6.1} µs   ratio {:.3}",
            base.name(),
            sa.ok_per_second(),
            sa.envoy_cpu_us_per_request(),
            other.name(),
            sb.ok_per_second(),
            sb.envoy_cpu_us_per_request(),
            ratios.last().copied().unwrap_or(f64::NAN)
        );
        add(&mut a, sa);
        add(&mut b, sb);
    }
    Ok(Comparison { base: (base, a), other: (other, b), ratios, extra_cpu_us, extra_cpu_share })
}
