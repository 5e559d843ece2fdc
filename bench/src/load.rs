//! Load: open loop at a fixed rate (so a dip in successful requests per second shows as a dip,
//! instead of the client slowing down), or closed loop; everything recorded per second of send
//! time: sent, succeeded, failed by kind, latency.

use harness::grpc;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic_health::pb::health_client::HealthClient;

/// Requests in flight beyond this are not sent but counted as failed: the client is saturated.
const MAX_IN_FLIGHT: usize = 20_000;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Second {
    pub sent: u64,
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub latency_us: Histogram<u64>,
}

/// Request latencies in µs, from 1 µs to a minute, two significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2)
        .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()))
}

impl Default for Second {
    fn default() -> Self {
        Self { sent: 0, ok: 0, failed: BTreeMap::new(), latency_us: latency_histogram() }
    }
}

impl Second {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

#[derive(Default)]
pub struct Recorder {
    seconds: Mutex<Vec<Second>>,
}

impl Recorder {
    fn with_second(&self, index: usize, f: impl FnOnce(&mut Second)) {
        if let Ok(mut s) = self.seconds.lock() {
            if s.len() <= index {
                s.resize_with(index + 1, Second::default);
            }
            if let Some(sec) = s.get_mut(index) {
                f(sec);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Second> {
        self.seconds.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Outcome of one request, in the terms a user would report it.
pub fn classify(result: &Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
    match result {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let flags = r.headers().get("x-envoy-response-flags").and_then(|v| v.to_str().ok()).unwrap_or("-");
            Err(format!("{} {}", r.status().as_u16(), flags))
        }
        Err(e) if e.is_timeout() => Err("client timeout".into()),
        Err(e) if e.is_connect() => Err("client connect".into()),
        Err(_) => Err("client error".into()),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

/// Records one finished request, sent in `second`, begun at `started`.
fn record(recorder: &Recorder, second: usize, started: Instant, result: Result<(), String>) {
    let micros = started.elapsed().as_micros() as u64;
    recorder.with_second(second, |s| {
        let _ = s.latency_us.record(micros.max(1));
        match result {
            Ok(()) => s.ok += 1,
            Err(kind) => *s.failed.entry(kind).or_insert(0) += 1,
        }
    });
}

/// One GET, read to its end: a response counts once it is complete.
async fn get(client: &reqwest::Client, url: &str) -> Result<(), String> {
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => match r.bytes().await {
            Ok(_) => Ok(()),
            Err(_) => Err("body reset".to_string()),
        },
        other => classify(&other),
    }
}

/// One unary gRPC call.
async fn call(mut client: HealthClient<tonic::transport::Channel>) -> Result<(), String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, grpc::check(&mut client)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("grpc {:?}", status.code())),
        Err(_) => Err("client timeout".into()),
    }
}

/// Starts `send(n)`, request n, at `rate` per second until `stop` is set; `start` is second 0.
/// Returns once the requests in flight have finished (bounded by the client timeout).
async fn paced<F, Fut>(rate: u32, start: Instant, stop: Arc<AtomicBool>, recorder: Arc<Recorder>, mut send: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let at = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(at).await;
        let request = send(n);
        n += 1;
        let second = at.duration_since(start).as_secs() as usize;
        recorder.with_second(second, |s| s.sent += 1);
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            recorder.with_second(second, |s| *s.failed.entry("client saturated".into()).or_insert(0) += 1);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (recorder, in_flight) = (Arc::clone(&recorder), Arc::clone(&in_flight));
        tokio::spawn(async move {
            let started = Instant::now();
            record(&recorder, second, started, request.await);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `rate` GETs per second until `stop` is set; `start` is second 0.
pub async fn open_loop(url: String, rate: u32, start: Instant, stop: Arc<AtomicBool>, recorder: Arc<Recorder>) {
    let client = client();
    paced(rate, start, stop, recorder, move |_| {
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url).await }
    })
    .await;
}

/// Channels (HTTP/2 connections) the gRPC load spreads calls over, so both Envoy workers serve.
const GRPC_CHANNELS: usize = 8;

/// As `open_loop`, with unary gRPC calls to Envoy's listener on `port`.
pub async fn grpc_open_loop(port: u16, rate: u32, start: Instant, stop: Arc<AtomicBool>, recorder: Arc<Recorder>) {
    let mut channels = vec![];
    for _ in 0..GRPC_CHANNELS {
        match grpc::client(port).await {
            Ok(c) => channels.push(c),
            Err(e) => eprintln!("gRPC client cannot connect to port {port}: {e}"),
        }
    }
    paced(rate, start, stop, recorder, move |n| {
        let client = channels.get(n as usize % channels.len().max(1)).cloned();
        async move {
            match client {
                Some(client) => call(client).await,
                None => Err("client connect".into()),
            }
        }
    })
    .await;
}

/// `concurrency` clients sending back to back until `stop` is set.
pub async fn closed_loop(
    url: String,
    concurrency: usize,
    start: Instant,
    stop: Arc<AtomicBool>,
    recorder: Arc<Recorder>,
) {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, recorder, stop) = (client.clone(), url.clone(), Arc::clone(&recorder), Arc::clone(&stop));
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let second = start.elapsed().as_secs() as usize;
                recorder.with_second(second, |s| s.sent += 1);
                let started = Instant::now();
                record(&recorder, second, started, get(&client, &url).await);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
