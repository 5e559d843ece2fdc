//! One VM's filter: what happens on each callback, written against the `Host` trait so that
//! attribution, probing, table caching and gauges run in native unit tests. `filter.rs` only
//! adapts proxy-wasm's callbacks to these methods.

use crate::budget::RetryBudget;
use crate::calm::{Calm, Path};
use crate::clusters::ClusterMap;
use crate::config::Config;
use crate::decision::{decide, needs_decisions, RequestFacts};
use crate::health::{attribute_steered, Applied, ClusterTable, Observation, Policy, Steered};
use crate::host::{Host, Level, Map, MetricKind};
use crate::inflight::InFlight;
use crate::outcome::{classify, effective_status, FailureKind, Outcome, ResponseFlags};
use crate::properties;
use crate::rng::Rng;
use crate::store;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};

/// Tables read from shared data are reused for this long before being read again. Local writes
/// refresh the cache at once; other workers' ejections arrive within this delay.
pub const TABLE_REFRESH_MS: u64 = 100;
const MAX_CACHED_CLUSTERS: usize = 1024;
const VM_SEQUENCE_KEY: &str = "churn-guard.v1.vm-sequence";
/// Headers that make a retry policy: a trusted client that sends one keeps its own.
const RETRY_POLICY_HEADERS: [&str; 3] = ["x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries"];
const STATUS_CODES_HEADER: &str = "x-envoy-retriable-status-codes";
/// Every retry header an untrusted client's request loses when the budget is spent.
const RETRY_HEADERS: [&str; 4] =
    ["x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries", STATUS_CODES_HEADER];
pub const DEBUG_HEADER: &str = "x-churn-guard";
/// How often the root context's tick runs: often enough to notice stalled requests early.
pub const TICK_MS: u64 = 50;
/// Metrics, gauges, expiry and probes of endpoints back from ejection run this often.
const PERIODIC_MS: u64 = 1_000;
/// Probes sent per cluster and second, per worker, to endpoints back from ejection.
const PROBES_PER_TICK: usize = 8;
/// Endpoints probed at most per cluster when a request stalls.
const MAX_SWEEP: usize = 128;
/// Without steering, and while no endpoint of a cluster is recovering, where a plain success
/// was served is read at most this often per cluster and VM (reading it costs Envoy a copy into
/// the VM): enough to keep every endpoint taking traffic known, and at low rates every success
/// is read anyway. Failures are always read.
const SUCCESS_SAMPLE_MS: u64 = 10;

/// Why a probe was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    /// The endpoint is back from an ejection: does it answer again?
    Return,
    /// A request to the cluster stalled: does the endpoint still answer quickly?
    Stall,
}

/// A counter bumped in the VM and handed to Envoy on the tick, to spare a host call per request.
#[derive(Default)]
struct Batched {
    id: Option<u32>,
    pending: Cell<u64>,
}

impl Batched {
    fn add(&self, by: u64) {
        self.pending.set(self.pending.get().saturating_add(by));
    }
}

/// Envoy stats, named `wasmcustom.churn_guard.*` in `/stats`. Counters from all workers add up.
#[derive(Default)]
struct Metrics {
    ejections: Option<u32>,
    /// Incremented on nearly every request: counted here, handed to Envoy once per tick.
    retries_added: Batched,
    /// Requests that took the calm path; likewise handed over once per tick.
    calm_requests: Batched,
    retries_denied: Option<u32>,
    retries_performed: Option<u32>,
    steered: Option<u32>,
    /// Sweeps of a cluster's endpoints because a request there waited too long.
    stalls: Option<u32>,
    fallbacks: Option<u32>,
    client_headers_removed: Option<u32>,
    no_upstream: Option<u32>,
    failures: [Option<u32>; FailureKind::ALL.len()],
    ejected_endpoints: Option<u32>,
    known_endpoints: Option<u32>,
}

impl Metrics {
    fn define(host: &impl Host) -> Self {
        let define = |kind, name: &str| {
            let id = host.define_metric(kind, name);
            if id.is_none() {
                host.log(Level::Warn, &format!("churn-guard: could not define metric {name}"));
            }
            id
        };
        let counter = |name: &str| define(MetricKind::Counter, name);
        Self {
            ejections: counter("churn_guard.ejections"),
            retries_added: Batched { id: counter("churn_guard.retries_added"), pending: Cell::new(0) },
            calm_requests: Batched { id: counter("churn_guard.calm_requests"), pending: Cell::new(0) },
            retries_denied: counter("churn_guard.retries_denied_budget"),
            retries_performed: counter("churn_guard.retries_performed"),
            steered: counter("churn_guard.steered"),
            stalls: counter("churn_guard.stall_sweeps"),
            fallbacks: counter("churn_guard.fallbacks"),
            client_headers_removed: counter("churn_guard.client_headers_removed"),
            no_upstream: counter("churn_guard.no_healthy_upstream"),
            failures: FailureKind::ALL.map(|k| counter(&format!("churn_guard.failures.{}", k.name()))),
            ejected_endpoints: define(MetricKind::Gauge, "churn_guard.ejected_endpoints"),
            known_endpoints: define(MetricKind::Gauge, "churn_guard.known_endpoints"),
        }
    }

    fn failure(&self, kind: FailureKind) -> Option<u32> {
        let idx = FailureKind::ALL.iter().position(|k| *k == kind)?;
        self.failures.get(idx).copied().flatten()
    }
}

struct CachedTable {
    table: ClusterTable,
    fetched_ms: u64,
    /// Some endpoint has failures, an ejection level or no answer since one: each success
    /// tells something, so every one is recorded.
    recovering: bool,
    /// When a success was last recorded while nothing was recovering.
    sampled_ms: u64,
}

impl CachedTable {
    fn new(table: ClusterTable, now_ms: u64, sampled_ms: u64) -> Self {
        Self { recovering: table.recovering(), table, fetched_ms: now_ms, sampled_ms }
    }
}

/// What one request carries from callback to callback.
#[derive(Debug, Default)]
pub struct RequestState {
    /// Cluster the request was first routed to, and the endpoints it was steered to there.
    cluster: Option<String>,
    steered: Vec<String>,
    /// The fallback header was set: the request left `cluster` for the fallback route.
    fell_back: bool,
    /// `grpc-status` of a gRPC call's answer: `Some` for gRPC calls, holding the status once
    /// seen (in the headers of a trailers-only answer, or in the trailers).
    grpc_status: Option<Option<u32>>,
    /// The request's id in the stall watch.
    watched: Option<u64>,
    /// The answer reached its end (headers, body or trailers ending the stream): nothing reset it.
    answered_in_full: bool,
    /// Taken on the calm path: its cluster was not read, nothing was steered.
    calm: bool,
    /// The stream's proxy-wasm context, through which the tick can read its cluster.
    context_id: u32,
}

impl RequestState {
    pub fn new(context_id: u32) -> Self {
        Self { context_id, ..Self::default() }
    }
}

/// A stream's cluster from its attributes: `xds.cluster_name`, or the older `cluster_name`.
fn cluster_of(property: impl Fn(&[&str]) -> Option<Vec<u8>>) -> Option<String> {
    property(&["xds", "cluster_name"])
        .and_then(properties::string)
        .or_else(|| property(&["cluster_name"]).and_then(properties::string))
}

/// A small number unique to this VM among the workers, for the debug header.
pub fn allocate_vm_id(store: &impl store::SharedStore) -> u32 {
    store::increment(store, VM_SEQUENCE_KEY).and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// Per-VM state shared by the root context and its HTTP contexts; replaced on reconfiguration.
pub struct Plugin<H: Host> {
    host: H,
    config: Config,
    /// Debug logging on? Asked of the host once per tick, not per request.
    debug: Cell<bool>,
    policy: Policy,
    metrics: Metrics,
    vm_id: u32,
    /// One budget per cluster: a failing cluster must not spend a healthy one's retries.
    budgets: RefCell<ClusterMap<RetryBudget>>,
    rng: RefCell<Rng>,
    tables: RefCell<ClusterMap<CachedTable>>,
    /// Probes in flight: call token → (cluster, endpoint, why).
    probes: RefCell<HashMap<u32, (String, String, ProbeKind)>>,
    /// Requests in flight: each endpoint's load, and those that get no answer. Steering only.
    inflight: Option<RefCell<InFlight>>,
    /// When the once-a-second work last ran.
    periodic_ms: Cell<Option<u64>>,
    /// The host's clock as last read: at most a tick old, since every tick reads it.
    clock_ms: Cell<u64>,
    /// Clusters this VM has seen listed in the shared registry (`store::CLUSTERS_KEY`).
    registered: RefCell<HashSet<String>>,
    /// The registry was full once; said once per VM, not per request.
    registry_full_logged: Cell<bool>,
    /// Whether requests may skip the per-request work now (`calm`).
    calm: RefCell<Calm>,
    /// Retries a calm request may get, whose cluster is not looked up: what the tightest
    /// budget allowed at the last look (a budget that never grants keeps it at 0).
    calm_retry_cap: Cell<u32>,
}

impl<H: Host> Plugin<H> {
    pub fn new(host: H, config: Config, vm_id: u32) -> Self {
        let seed = host.now_ms() ^ (u64::from(vm_id) << 48);
        let inflight = config.endpoint_override.as_ref().map(|o| RefCell::new(InFlight::new(o.stall_after_ms)));
        Self {
            debug: Cell::new(host.debug_enabled()),
            policy: Policy::from_config(&config),
            budgets: RefCell::new(ClusterMap::new(MAX_CACHED_CLUSTERS)),
            metrics: Metrics::define(&host),
            config,
            vm_id,
            rng: RefCell::new(Rng::new(seed)),
            tables: RefCell::new(ClusterMap::new(MAX_CACHED_CLUSTERS)),
            probes: RefCell::new(HashMap::new()),
            inflight,
            periodic_ms: Cell::new(None),
            clock_ms: Cell::new(0),
            registered: RefCell::new(HashSet::new()),
            registry_full_logged: Cell::new(false),
            calm: RefCell::new(Calm::default()),
            calm_retry_cap: Cell::new(0),
            host,
        }
    }

    /// Reads the host's clock (a host call).
    fn now(&self) -> u64 {
        let now = self.host.now_ms().max(self.clock_ms.get());
        self.clock_ms.set(now);
        now
    }

    /// The clock as last read by a request or the tick: up to `TICK_MS` behind, and no host
    /// call. Good enough for the end of a request; a healthy one then costs one clock read.
    fn recent_clock(&self) -> u64 {
        self.clock_ms.get()
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    fn log(&self, level: Level, message: &str) {
        self.host.log(level, message);
    }

    fn inc(&self, metric: Option<u32>, by: u64) {
        if let (Some(id), true) = (metric, by > 0) {
            self.host.increment_metric(id, by);
        }
    }

    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool {
        let ok = self.host.set_header(map, name, value);
        if !ok {
            self.log(Level::Warn, &format!("churn-guard: could not set header {name}"));
        }
        ok
    }

    fn property_string(&self, path: &[&str]) -> Option<String> {
        self.host.property(path).and_then(properties::string)
    }

    fn property_int(&self, path: &[&str]) -> Option<u64> {
        self.host.property(path).and_then(|b| properties::int(&b))
    }

    /// The cluster the request is routed to: known once the route is resolved.
    fn cluster_name(&self) -> Option<String> {
        cluster_of(|path| self.host.property(path))
    }

    /// Counts `weight` original requests to `cluster` and returns the retries its budget allows
    /// now.
    fn budget_deposit(&self, cluster: &str, now_ms: u64, weight: u64) -> u32 {
        let mut budgets = self.budgets.borrow_mut();
        match budgets.get_or_insert_with(cluster, now_ms, || RetryBudget::new(&self.config.retry.budget)) {
            Some(b) => {
                b.deposit(now_ms, weight);
                b.available(now_ms)
            }
            None => 0,
        }
    }

    fn budget_withdraw(&self, cluster: &str, now_ms: u64, retries: u32) {
        // Nearly every request: no retry, nothing to charge, no lookup.
        if retries == 0 {
            return;
        }
        if let Some(b) = self.budgets.borrow_mut().get_mut(cluster, now_ms) {
            b.withdraw(now_ms, retries);
        }
    }

    fn with_table<R>(&self, cluster: &str, now_ms: u64, f: impl FnOnce(&ClusterTable) -> R) -> R {
        let mut tables = self.tables.borrow_mut();
        let fresh =
            tables.get_mut(cluster, now_ms).is_some_and(|c| now_ms.saturating_sub(c.fetched_ms) < TABLE_REFRESH_MS);
        if !fresh {
            let table = store::load(&self.host, cluster);
            drop(tables);
            self.remember(cluster, table, now_ms);
            tables = self.tables.borrow_mut();
        }
        match tables.get(cluster) {
            Some(c) => f(&c.table),
            None => f(&ClusterTable::default()),
        }
    }

    fn remember(&self, cluster: &str, table: ClusterTable, now_ms: u64) {
        let mut tables = self.tables.borrow_mut();
        let empty = || CachedTable::new(ClusterTable::default(), now_ms, 0);
        if let Some(cached) = tables.get_or_insert_with(cluster, now_ms, empty) {
            *cached = CachedTable::new(table, now_ms, cached.sampled_ms);
        }
    }

    /// Records observations of one finished request in the shared table.
    fn observe(&self, cluster: &str, observations: &[Observation<'_>], now_ms: u64) {
        let suspect_ms = self.config.endpoint_override.as_ref().map_or(0, |o| o.suspect_ms);
        let needed = self.with_table(cluster, now_ms, |t| observations.iter().any(|o| t.would_change(o, now_ms)));
        if !needed {
            return;
        }
        let result = store::update(&self.host, cluster, now_ms, |table| {
            let mut all = Applied::default();
            for obs in observations {
                let applied = table.apply(obs, now_ms, &self.policy, suspect_ms);
                all.changed |= applied.changed;
                all.ejected.extend(applied.ejected);
            }
            all
        });
        match result {
            Ok((table, applied)) => {
                self.inc(self.metrics.ejections, applied.ejected.len() as u64);
                if self.debug.get() {
                    for (address, ms) in &applied.ejected {
                        self.log(
                            Level::Debug,
                            &format!("churn-guard: ejected {address} of cluster {cluster} for {ms} ms"),
                        );
                    }
                }
                // Requests there are decided differently now: no calm anywhere.
                if needs_decisions(&self.config, &table, now_ms) {
                    self.trouble(now_ms);
                }
                self.remember(cluster, table, now_ms);
                self.register(cluster, now_ms);
            }
            Err(e) => self.store_error(cluster, e),
        }
    }

    fn store_error(&self, cluster: &str, e: store::UpdateError) {
        if e == store::UpdateError::Full {
            if !self.registry_full_logged.replace(true) {
                self.log(
                    Level::Warn,
                    &format!(
                        "churn-guard: {} clusters already have shared state; cluster {cluster} and others get none \
                         until some expire",
                        store::MAX_CLUSTERS
                    ),
                );
            }
            return;
        }
        self.log(Level::Warn, &format!("churn-guard: could not record observation for cluster {cluster}: {e:?}"));
    }

    /// Something went wrong here: requests take the full path again, on every worker.
    fn trouble(&self, now_ms: u64) {
        if self.calm.borrow_mut().trouble(now_ms) && store::increment(&self.host, store::ALARM_KEY).is_none() {
            self.log(Level::Warn, "churn-guard: could not raise the shared alarm; other workers may stay calm");
        }
    }

    /// Probes endpoints back from an ejection, each pinned to its endpoint with the override
    /// header, so they return to rotation (and end a fallback) only once they answer.
    fn probe(&self, now_ms: u64) {
        let Some(o) = &self.config.endpoint_override else { return };
        let ttl = self.config.ejection.endpoint_ttl_ms;
        let clusters: Vec<String> = self.tables.borrow().clusters().map(str::to_string).collect();
        for cluster in clusters {
            let targets: Vec<String> = self.with_table(&cluster, now_ms, |t| {
                t.unproven_addresses(now_ms, ttl).into_iter().take(PROBES_PER_TICK).map(str::to_string).collect()
            });
            for target in targets {
                self.send_probe(&cluster, target, o.probe_timeout_ms, ProbeKind::Return);
            }
        }
    }

    /// Probes the endpoints of clusters where a request has waited too long for an answer, each
    /// with as long to answer: a pod that vanished does not, a live one answers in time.
    fn sweep_stalled(&self, now_ms: u64) {
        let Some(watch) = &self.inflight else { return };
        // A sweep is no trouble by itself: an overloaded gateway's slowest requests cross the
        // thresholds too, and leaving the calm path there would raise its cost just when it has
        // least to spare. What a sweep finds (a doubted endpoint, a probe that gets no answer)
        // changes the table, and that ends the calm (`observe`).
        let stalled = watch.borrow_mut().stalled(now_ms);
        let ttl = self.config.ejection.endpoint_ttl_ms;
        for s in stalled {
            // Where stalled requests were steered is where they most likely wait: doubted at
            // once, without waiting for a probe.
            let doubted: Vec<Observation<'_>> = s.endpoints.iter().map(|e| Observation::Suspect(e)).collect();
            if !doubted.is_empty() {
                self.observe(&s.cluster, &doubted, now_ms);
            }
            let Some(timeout_ms) = s.sweep_timeout_ms else { continue };
            let targets: Vec<String> = self.with_table(&s.cluster, now_ms, |t| {
                let c = t.candidates(now_ms, ttl);
                c.proven.into_iter().chain(c.probe_answered).take(MAX_SWEEP).map(str::to_string).collect()
            });
            if self.debug.get() {
                self.log(
                    Level::Debug,
                    &format!(
                        "churn-guard: a request to {} waits beyond {} ms: doubting [{}], probing {} endpoints",
                        s.cluster,
                        timeout_ms,
                        s.endpoints.join(","),
                        targets.len()
                    ),
                );
            }
            self.inc(self.metrics.stalls, 1);
            for target in targets {
                self.send_probe(&s.cluster, target, timeout_ms, ProbeKind::Stall);
            }
        }
    }

    /// One probe, pinned to `target` with the override header; none if one is in flight already.
    fn send_probe(&self, cluster: &str, target: String, timeout_ms: u64, kind: ProbeKind) {
        let Some(o) = &self.config.endpoint_override else { return };
        if self.probes.borrow().values().any(|(c, a, _)| c == cluster && *a == target) {
            return;
        }
        let headers = [
            (":method", "GET"),
            (":path", o.probe_path.as_str()),
            (":authority", "churn-guard-probe"),
            (o.header.as_str(), target.as_str()),
        ];
        match self.host.dispatch(cluster, &headers, timeout_ms) {
            Ok(token) => {
                self.probes.borrow_mut().insert(token, (cluster.to_string(), target, kind));
            }
            Err(e) => self.log(Level::Warn, &format!("churn-guard: cannot probe {target} of cluster {cluster}: {e}")),
        }
    }

    /// The answer to probe `token`: its headers are the host's `ProbeResponseHeaders`.
    pub fn on_probe_response(&self, token: u32) {
        let Some((cluster, address, kind)) = self.probes.borrow_mut().remove(&token) else { return };
        let status = self.host.header(Map::ProbeResponseHeaders, ":status").and_then(|s| s.parse::<u32>().ok());
        // A gRPC server answers any path, `/` included, with HTTP 200 and a `grpc-status`:
        // UNIMPLEMENTED (501) still shows a server that answers; UNAVAILABLE (503) does not.
        let status = status.map(|code| effective_status(code, self.grpc_status(Map::ProbeResponseHeaders)));
        let observation = match status {
            Some(code) if code < 500 || code == 501 => Observation::ProbeAnswered(&address),
            // No answer within a stall's short wait (Envoy answers a call that timed out with
            // its own 504): doubted, not failed. The endpoint may just be slow; a probe with
            // the full timeout tells.
            _ if kind == ProbeKind::Stall => {
                if let Some(watch) = &self.inflight {
                    watch.borrow_mut().silence_found(&cluster, self.recent_clock());
                }
                Observation::Suspect(&address)
            }
            Some(_) => Observation::Failure(&address, FailureKind::GatewayError),
            // No response at all: the connection failed or the probe timed out.
            None => Observation::Failure(&address, FailureKind::ConnectFailure),
        };
        if self.debug.get() {
            self.log(Level::Debug, &format!("churn-guard: probe of {address} ({cluster}): {status:?}"));
        }
        self.observe(&cluster, &[observation], self.now());
    }

    fn grpc_status(&self, map: Map) -> Option<u32> {
        self.host.header(map, "grpc-status").and_then(|s| s.parse().ok())
    }

    /// Keeps `cluster` listed in shared data, so that every VM's gauges include it: creating its
    /// table lists it, but it may have expired since while this VM still routes to it.
    fn register(&self, cluster: &str, now_ms: u64) {
        let mut registered = self.registered.borrow_mut();
        if registered.contains(cluster) || registered.len() >= store::MAX_CLUSTERS {
            return;
        }
        match store::register(&self.host, cluster, now_ms) {
            Ok(()) => {
                registered.insert(cluster.to_string());
            }
            Err(e) => {
                drop(registered);
                self.store_error(cluster, e);
            }
        }
    }

    /// Every tick: stalled requests. Once a second: metrics handed over, gauges, expiry, probes
    /// of endpoints back from ejection.
    pub fn on_tick(&self) {
        let now = self.now();
        self.calm.borrow_mut().alarm_read(store::counter(&self.host, store::ALARM_KEY), now);
        if self.periodic_ms.get().is_none_or(|at| now.saturating_sub(at) >= PERIODIC_MS) {
            self.periodic_ms.set(Some(now));
            self.debug.set(self.host.debug_enabled());
            let healthy = self.housekeeping(now);
            self.calm.borrow_mut().settle(now, healthy && !self.config.debug_header);
            self.probe(now);
        }
        self.route_waiting(now);
        self.sweep_stalled(now);
    }

    /// Calm requests still unanswered past the stall floor: their clusters are read now,
    /// through their streams, so that the stall watch judges them as any other.
    fn route_waiting(&self, now_ms: u64) {
        let Some(watch) = &self.inflight else { return };
        let waiting = watch.borrow().unrouted_waiting(now_ms);
        for (id, context_id) in waiting {
            let cluster = cluster_of(|path| self.host.stream_property(context_id, path));
            watch.borrow_mut().route(id, cluster.as_deref());
        }
    }

    /// Gauges over every cluster with a table in shared data, not just those this VM has served
    /// (all VMs, including the main thread's, which serves none, then report the same figures);
    /// shared state of clusters nobody routed to for the TTL is removed, and so is this VM's own.
    /// Returns whether every listed cluster's table would leave requests undecided, no sweep
    /// is finding silent endpoints and no exploration is paused: whether this VM may be calm.
    fn housekeeping(&self, now_ms: u64) -> bool {
        for batched in [&self.metrics.retries_added, &self.metrics.calm_requests] {
            self.inc(batched.id, batched.pending.replace(0));
        }
        let ttl = self.config.ejection.endpoint_ttl_ms;
        let (mut ejected, mut known) = (0, 0);
        let mut undecided = true;
        let listed = store::clusters(&self.host);
        for cluster in &listed {
            let look = |t: &ClusterTable| {
                let (e, k) = t.counts(now_ms, ttl);
                (e, k, t.is_expired(now_ms, ttl), !needs_decisions(&self.config, t, now_ms))
            };
            let cached = self.tables.borrow().contains(cluster);
            let (e, k, expired, plain) =
                if cached { self.with_table(cluster, now_ms, look) } else { look(&store::load(&self.host, cluster)) };
            ejected += e;
            known += k;
            undecided &= plain;
            if expired {
                match store::retire(&self.host, cluster, now_ms, ttl) {
                    Ok(true) => {
                        self.tables.borrow_mut().remove(cluster);
                        if self.debug.get() {
                            self.log(Level::Debug, &format!("churn-guard: cluster {cluster} expired"));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => self.log(Level::Warn, &format!("churn-guard: could not expire {cluster}: {e:?}")),
                }
            }
        }
        for (gauge, value) in [(self.metrics.ejected_endpoints, ejected), (self.metrics.known_endpoints, known)] {
            if let Some(id) = gauge {
                self.host.record_metric(id, value as u64);
            }
        }
        // Listed again by the next observation if another VM removed it from the registry.
        self.registered.borrow_mut().retain(|c| listed.contains(c));
        self.tables.borrow_mut().expire(now_ms, ttl);
        self.budgets.borrow_mut().expire(now_ms, ttl);
        let idle = RetryBudget::new(&self.config.retry.budget).available(now_ms);
        let tightest = self.budgets.borrow().values().map(|b| b.available(now_ms)).fold(idle, u32::min);
        self.calm_retry_cap.set(tightest);
        match &self.inflight {
            Some(watch) => {
                let mut watch = watch.borrow_mut();
                watch.expire(now_ms, ttl);
                undecided && watch.quiet(now_ms)
            }
            None => undecided,
        }
    }

    pub fn on_request_headers(&self, req: &mut RequestState) {
        // Header by header rather than the whole map: a header that is absent (most here) costs
        // no copy into the VM, and a present one costs the same whatever else the client sent.
        let header = |name: &str| self.host.header(Map::RequestHeaders, name);
        // Before the route is looked at: a client's fallback header would have chosen it.
        let mut removed = 0;
        for name in self.config.untrusted_headers() {
            if header(name).is_some() && self.set_header(Map::RequestHeaders, name, None) {
                removed += 1;
            }
        }
        self.inc(self.metrics.client_headers_removed, removed);
        let method = header(":method").unwrap_or_default();
        let method = method.as_str();
        let grpc = method == "POST" && header("content-type").is_some_and(|t| t.starts_with("application/grpc"));
        if grpc {
            req.grpc_status = Some(None);
        }
        let mut facts = RequestFacts {
            grpc,
            method,
            // A client's own retry headers count only where clients are trusted; elsewhere the
            // filter's budgeted policy replaces them (`write_retry_headers`).
            has_retry_headers: self.config.trust_client_headers
                && RETRY_POLICY_HEADERS.iter().any(|h| header(h).is_some()),
            // Someone trusted steers this request already.
            has_override_header: self.config.trust_client_headers
                && self.config.endpoint_override.as_ref().is_some_and(|o| header(&o.header).is_some()),
            exploration_paused: false,
        };
        // gRPC calls read their status anyway, and are judged by it at the end: the full path.
        let path = if grpc { Path::Full { weight: 1 } } else { self.calm.borrow_mut().path(self.recent_clock()) };
        let weight = match path {
            Path::Calm => return self.calm_request(req, &facts),
            Path::Full { weight } => weight,
        };
        let now = self.now();
        let Some(cluster) = self.cluster_name() else { return };
        let inflight = self.inflight.as_ref().map(RefCell::borrow);
        facts.exploration_paused = inflight.as_ref().is_some_and(|f| f.exploration_paused(&cluster, now));
        let available = self.budget_deposit(&cluster, now, weight);
        let load = |endpoint: &str| inflight.as_ref().map_or(0, |f| f.load(endpoint));
        let mut decision = self.with_table(&cluster, now, |t| {
            decide(&self.config, &facts, t, now, available, &mut self.rng.borrow_mut(), &load)
        });
        // Pods are vanishing here: an attempt that may be replayed (`reset` is retried) gives
        // up on a silent endpoint after a few stall thresholds rather than the configured wait.
        // Checked cheapest first: POSTs and fallbacks skip the cluster lookup.
        let factor = self.config.endpoint_override.as_ref().map_or(0, |o| o.stalled_attempt_factor);
        if let (Some(plan), false, Some(watch)) = (decision.retry.as_mut(), decision.fallback, &inflight) {
            if plan.retry_on.split(',').any(|c| c == "reset") {
                if let Some(active) = watch.active_per_try_timeout_ms(&cluster, now, factor) {
                    plan.per_try_timeout_ms = Some(plan.per_try_timeout_ms.map_or(active, |t| t.min(active)));
                }
            }
        }
        drop(inflight);

        self.write_retry_headers(&decision, facts.grpc);
        let request = Map::RequestHeaders;
        if let (false, Some(o)) = (decision.steer.is_empty(), &self.config.endpoint_override) {
            if self.set_header(request, &o.header, Some(&decision.steer.join(","))) {
                self.inc(self.metrics.steered, 1);
                req.steered = decision.steer;
            }
        }
        // Last, because Envoy re-resolves the route when a request header changes.
        if let (true, Some(f)) = (decision.fallback, &self.config.fallback) {
            if self.set_header(request, &f.header, Some(&f.value)) {
                self.inc(self.metrics.fallbacks, 1);
                req.fell_back = true;
            }
        }
        // Only requests to the cluster's endpoints: a stall there is what probes can explain.
        if let (false, Some(watch)) = (req.fell_back, &self.inflight) {
            let first = req.steered.first().map(String::as_str);
            req.watched = watch.borrow_mut().begin(&cluster, first, now);
        }
        if self.debug.get() {
            self.log(
                Level::Debug,
                &format!(
                    "churn-guard: {method} cluster={cluster} retries={} steer=[{}] fallback={}",
                    decision.retry.as_ref().map_or(0, |r| r.max_retries),
                    req.steered.join(","),
                    decision.fallback
                ),
            );
        }
        req.cluster = Some(cluster);
    }

    /// A request while calm: decided as one to a cluster nothing is known of, which is what
    /// every cluster's table looked like at the last look and what no trouble has changed
    /// since. Nothing is read but the method (and the headers that everything reads).
    fn calm_request(&self, req: &mut RequestState, facts: &RequestFacts<'_>) {
        req.calm = true;
        self.metrics.calm_requests.add(1);
        // The stall watch needs when the request began; the clock costs no copy.
        let now = if self.inflight.is_some() { self.now() } else { self.recent_clock() };
        // No budget lookup without the cluster: calm means no retry was seen for
        // `CALM_AFTER_MS`, so the tightest budget at the last look stands for all; the requests
        // already under way when trouble starts get their retries up front, as on the full path.
        let cap = self.calm_retry_cap.get();
        let decision =
            decide(&self.config, facts, &ClusterTable::default(), now, cap, &mut self.rng.borrow_mut(), &|_| 0);
        self.write_retry_headers(&decision, facts.grpc);
        if let Some(watch) = &self.inflight {
            req.watched = watch.borrow_mut().begin_unrouted(req.context_id, now);
        }
    }

    /// Writes the retry plan over whatever retry headers the request came with. Without a plan
    /// because the budget is spent, an untrusted client's own retry headers are removed, so
    /// that no caller Envoy keeps `x-envoy-*` headers from can retry past the budget.
    fn write_retry_headers(&self, decision: &crate::decision::Decision<'_>, grpc: bool) {
        let request = Map::RequestHeaders;
        if let Some(plan) = &decision.retry {
            let mut ok = self.set_header(request, "x-envoy-retry-on", Some(plan.retry_on))
                && self.set_header(request, "x-envoy-max-retries", Some(&plan.max_retries.to_string()));
            if let Some(codes) = plan.status_codes {
                ok &= self.set_header(request, STATUS_CODES_HEADER, Some(codes));
            } else if !self.config.trust_client_headers && self.host.header(request, STATUS_CODES_HEADER).is_some() {
                // Envoy adds a client's codes to a route's own `retriable-status-codes`.
                ok &= self.set_header(request, STATUS_CODES_HEADER, None);
            }
            // A gRPC call replayed on a status it may have run after: only on the configured
            // statuses, never on a client's.
            if plan.grpc_retry_on.is_some() || (grpc && !self.config.trust_client_headers) {
                ok &= self.set_header(request, "x-envoy-retry-grpc-on", plan.grpc_retry_on);
            }
            if let Some(ms) = plan.per_try_timeout_ms {
                ok &= self.set_header(request, "x-envoy-upstream-rq-per-try-timeout-ms", Some(&ms.to_string()));
            }
            if ok {
                self.metrics.retries_added.add(1);
            }
        }
        if decision.budget_exhausted {
            self.inc(self.metrics.retries_denied, 1);
            if !self.config.trust_client_headers {
                for name in RETRY_HEADERS {
                    self.set_header(request, name, None);
                }
            }
        }
    }

    pub fn on_response_headers(&self, req: &mut RequestState, end_of_stream: bool) {
        req.answered_in_full = end_of_stream;
        if let (Some(id), Some(watch)) = (req.watched, &self.inflight) {
            watch.borrow_mut().answered(id);
        }
        if let Some(status) = &mut req.grpc_status {
            // Trailers-only: the call's status is in the headers.
            *status = self.grpc_status(Map::ResponseHeaders);
        }
        if !self.config.debug_header {
            return;
        }
        // Report on the cluster the route chose first: after a fallback, that is the stale one.
        let Some(routed) = req.cluster.clone().or_else(|| self.cluster_name()) else { return };
        let now = self.now();
        let ejected = self.with_table(&routed, now, |t| t.ejected_addresses(now).collect::<Vec<_>>().join(","));
        let value = format!(
            "vm={}; cluster={routed}; ejected={ejected}; steered={}; fallback={}",
            self.vm_id,
            req.steered.join(","),
            req.fell_back,
        );
        self.set_header(Map::ResponseHeaders, DEBUG_HEADER, Some(&value));
    }

    pub fn on_response_body(&self, req: &mut RequestState, end_of_stream: bool) {
        req.answered_in_full |= end_of_stream;
    }

    pub fn on_response_trailers(&self, req: &mut RequestState) {
        req.answered_in_full = true;
        if let Some(status) = &mut req.grpc_status {
            *status = self.grpc_status(Map::ResponseTrailers).or(*status);
        }
    }

    /// Whether a plain success at `cluster` is worth reading where it was served: always with
    /// `endpointOverride`, whose steering and blame need every endpoint that ever answered
    /// known (a pod that turns sick after one answer is otherwise never in a steered list,
    /// so never blamed for the retries it causes); else always while an endpoint is
    /// recovering, and once per `SUCCESS_SAMPLE_MS` otherwise.
    fn success_wanted(&self, cluster: &str, now_ms: u64) -> bool {
        if self.config.endpoint_override.is_some() {
            return true;
        }
        let mut tables = self.tables.borrow_mut();
        let Some(cached) = tables.get_mut(cluster, now_ms) else { return true };
        if cached.recovering || now_ms.saturating_sub(cached.fetched_ms) >= TABLE_REFRESH_MS {
            return true;
        }
        if now_ms.saturating_sub(cached.sampled_ms) < SUCCESS_SAMPLE_MS {
            return false;
        }
        cached.sampled_ms = now_ms;
        true
    }

    pub fn on_log(&self, req: &mut RequestState) {
        // A calm request answered in full is left to the samples: even whether it needed a
        // retry would cost a copy. One whose answer was cut is looked at in full.
        if req.calm && req.answered_in_full {
            if let (Some(id), Some(watch)) = (req.watched.take(), &self.inflight) {
                watch.borrow_mut().end(id, self.recent_clock(), true);
            }
            return;
        }
        // The route only changes cluster when the fallback header re-routed it.
        // on_log is the request's last callback: take the name rather than copy it.
        let routed = req.cluster.take();
        let cluster = match (&routed, req.fell_back) {
            (Some(c), false) => c.clone(),
            _ => match self.cluster_name() {
                Some(c) => c,
                None => return,
            },
        };
        let http_status = self.property_int(&["response", "code"]).unwrap_or(0);
        let status = effective_status(u32::try_from(http_status).unwrap_or(0), req.grpc_status.flatten());
        // A stream the endpoint reset after its answer began (a gRPC stream, a long body) has a
        // 200 and a reset flag; an answer that reached its end has no flag telling more than
        // its status.
        let complete_success =
            req.answered_in_full && classify(status, ResponseFlags::default(), true) == Outcome::Success;
        let flags = if complete_success {
            ResponseFlags::default()
        } else {
            ResponseFlags(self.property_int(&["response", "flags"]).unwrap_or(0))
        };
        let attempts = self.property_int(&["upstream", "request_attempt_count"]).unwrap_or(1);
        let retries = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
        let now = self.recent_clock();
        let plain_success = retries == 0
            && req.steered.is_empty()
            && !req.fell_back
            && (complete_success || classify(status, flags, true) == Outcome::Success);
        let address = if plain_success && !self.success_wanted(&cluster, now) {
            None
        } else {
            self.property_string(&["upstream", "address"]).filter(|a| properties::is_ip_endpoint(a))
        };
        if let Some(watch) = &self.inflight {
            let mut watch = watch.borrow_mut();
            if let Some(id) = req.watched.take() {
                watch.end(id, now, attempts <= 1);
            }
            if req.steered.is_empty() && !req.fell_back {
                watch.balancer_retried(&cluster, attempts.saturating_sub(1), now);
            }
        }
        // Charged where the request was routed first: that cluster's budget granted the retries.
        self.budget_withdraw(routed.as_deref().unwrap_or(&cluster), now, retries);
        self.inc(self.metrics.retries_performed, u64::from(retries));

        let outcome = if plain_success { Outcome::Success } else { classify(status, flags, address.is_some()) };
        if retries > 0 || matches!(outcome, Outcome::Failure(_) | Outcome::NoUpstream) {
            self.trouble(now);
        }
        let mut observations = Vec::with_capacity(req.steered.len() + 2);
        let steered_here = !req.steered.is_empty() && !req.fell_back;
        let mut attributed = 0u32;
        if let (true, Some(addr)) = (steered_here, &address) {
            match attribute_steered(&req.steered, addr, attempts) {
                Steered::Failed(failed) => {
                    self.inc(self.metrics.failure(FailureKind::RetriedAttempt), failed.len() as u64);
                    observations.extend(failed.iter().map(|a| Observation::Failure(a, FailureKind::RetriedAttempt)));
                    attributed = u32::try_from(failed.len()).unwrap_or(u32::MAX);
                }
                Steered::Absent(absent) => observations.extend(absent.iter().map(|a| Observation::Absent(a))),
                Steered::Suspect(suspect) => observations.extend(suspect.iter().map(|a| Observation::Suspect(a))),
            }
        }
        match (outcome, &address) {
            (Outcome::Success, Some(addr)) => observations.push(Observation::Success(addr)),
            (Outcome::Failure(kind), Some(addr)) => {
                self.inc(self.metrics.failure(kind), 1);
                observations.push(Observation::Failure(addr, kind));
            }
            (Outcome::NoUpstream, _) => {
                self.inc(self.metrics.no_upstream, 1);
                observations.push(Observation::NoUpstream);
            }
            _ => {}
        }
        // Retries whose endpoints are not known: steer until they are.
        if retries > attributed && self.config.endpoint_override.is_some() {
            observations.push(Observation::Unattributed);
        }
        if !observations.is_empty() {
            self.observe(&cluster, &observations, now);
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::host::fake::FakeHost;
    use crate::outcome::ResponseFlags;

    const CLUSTER: &str = "httproute/default/backend/rule/0";
    const A: &str = "10.0.0.1:8080";
    const B: &str = "10.0.0.2:8080";
    const C: &str = "10.0.0.3:8080";
    const STEERING: &str = r#"{"endpointOverride":{"exploreRatio":0}}"#;

    fn plugin(config: &str) -> Plugin<FakeHost> {
        let host = FakeHost::default();
        host.clock_ms.set(1_000_000);
        host.debug.set(true);
        let _ = store::ensure_registry(&host);
        let config = Config::parse(config.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        Plugin::new(host, config, 1)
    }

    fn start(p: &Plugin<FakeHost>, headers: &[(&str, &str)]) -> RequestState {
        let host = p.host();
        host.clear_properties();
        host.set_property("xds.cluster_name", CLUSTER.as_bytes());
        host.set_map(Map::RequestHeaders, headers);
        host.set_map(Map::ResponseHeaders, &[]);
        host.set_map(Map::ResponseTrailers, &[]);
        let mut req = RequestState::default();
        p.on_request_headers(&mut req);
        req
    }

    fn get(p: &Plugin<FakeHost>) -> RequestState {
        start(p, &[(":method", "GET"), (":path", "/")])
    }

    /// Envoy's account of the finished request: status, flags, last endpoint, attempts.
    fn finish(p: &Plugin<FakeHost>, req: &mut RequestState, status: u64, flags: u64, address: &str, attempts: u64) {
        let host = p.host();
        host.set_int("response.code", status);
        host.set_int("response.flags", flags);
        host.set_property("upstream.address", address.as_bytes());
        host.set_int("upstream.request_attempt_count", attempts);
        p.on_log(req);
    }

    fn served(p: &Plugin<FakeHost>, address: &str) {
        let mut req = get(p);
        p.on_response_headers(&mut req, true);
        finish(p, &mut req, 200, 0, address, 1);
    }

    /// Plain successes at each of `endpoints`, a sample period apart: while nothing recovers,
    /// successes closer together than that are not all read.
    fn learn(p: &Plugin<FakeHost>, endpoints: &[&str]) {
        for a in endpoints {
            p.host().advance(SUCCESS_SAMPLE_MS);
            served(p, a);
        }
    }

    fn table(p: &Plugin<FakeHost>) -> ClusterTable {
        store::load(&p.host().store, CLUSTER)
    }

    fn calls(p: &Plugin<FakeHost>) -> HashMap<&'static str, u32> {
        p.host().calls.borrow().clone()
    }

    /// A VM that has looked at the shared tables on its tick and found nothing wrong.
    fn calm_plugin(config: &str) -> Plugin<FakeHost> {
        let p = plugin(config);
        p.host().debug.set(false);
        p.on_tick();
        assert!(p.calm.borrow().is_calm());
        p
    }

    #[test]
    fn while_calm_a_healthy_request_costs_the_method_and_the_retry_headers() {
        let p = calm_plugin("{}");
        served(&p, A); // the first request after a tick takes the full path
        p.host().reset_calls();
        let mut req = get(&p);
        assert!(req.calm && req.cluster.is_none());
        p.on_response_headers(&mut req, true);
        finish(&p, &mut req, 200, 0, A, 1);
        // The method, and a look for a client's status codes (absent: nothing copied); two
        // retry headers written. No clock, no cluster, no shared data, nothing of the answer.
        let expected: HashMap<&str, u32> = [("get_map_value", 2), ("set_map_value", 2)].into();
        assert_eq!(calls(&p), expected);
        let written = p.host().map(Map::RequestHeaders);
        assert!(written.iter().any(|(k, v)| k == "x-envoy-max-retries" && v == "10"), "{written:?}");
    }

    #[test]
    fn a_request_on_the_full_path_costs_a_few_host_calls_more_and_no_shared_data() {
        let p = plugin("{}"); // not calm before its first tick
        p.debug.set(false);
        served(&p, A);
        p.host().advance(1);
        p.host().reset_calls();
        served(&p, A);
        // The clock once; the method and a look for a client's status codes; the route's
        // cluster; two retry headers written; status and attempts of the finished request, but
        // neither its flags (it was answered in full) nor where a success was served, just learnt.
        let expected: HashMap<&str, u32> =
            [("get_current_time", 1), ("get_map_value", 2), ("get_property", 3), ("set_map_value", 2)].into();
        assert_eq!(calls(&p), expected);
    }

    #[test]
    fn while_calm_a_sample_of_requests_takes_the_full_path_and_feeds_the_budget_for_all() {
        let p = calm_plugin(r#"{"retry":{"budget":{"ratio":1.0,"minRetriesPerSecond":0}}}"#);
        let full: Vec<bool> = (0..(2 * crate::calm::SAMPLE_EVERY)).map(|_| get(&p).cluster.is_some()).collect();
        assert_eq!(full.iter().filter(|f| **f).count(), 2, "{full:?}");
        // Every request counted, calm ones through the sample that stands for them; the full
        // request below is counted as well.
        let available = p.budget_deposit(CLUSTER, p.recent_clock(), 1);
        assert_eq!(available, u32::try_from(2 * crate::calm::SAMPLE_EVERY + 1).unwrap_or(0));
    }

    #[test]
    fn calm_requests_get_no_more_retries_than_the_tightest_budget_allowed() {
        let p = calm_plugin(r#"{"retry":{"budget":{"ratio":0,"minRetriesPerSecond":0}}}"#);
        served(&p, A);
        let req = get(&p);
        assert!(req.calm);
        assert_eq!(sent(&p, "x-envoy-max-retries"), None, "a budget that never grants");
        assert_eq!(p.host().metric("retries_denied_budget"), 2);
    }

    #[test]
    fn a_sampled_request_that_needed_a_retry_ends_the_calm_everywhere() {
        let p = calm_plugin("{}");
        served(&p, A);
        let alarm = store::counter(&p.host().store, store::ALARM_KEY);
        // Every request needs a retry now; calm ones are not looked at, the next sample is.
        let mut calm = 0;
        while p.calm.borrow().is_calm() {
            let mut req = get(&p);
            calm += u64::from(req.calm);
            p.on_response_headers(&mut req, true);
            finish(&p, &mut req, 200, 0, B, 2);
            assert!(calm < crate::calm::SAMPLE_EVERY, "no sample in {calm} requests");
        }
        assert_eq!(p.host().metric("retries_performed"), 1, "the sample's retry, charged to its cluster");
        assert_eq!(store::counter(&p.host().store, store::ALARM_KEY), alarm + 1, "the other workers are told");
        assert!(get(&p).cluster.is_some(), "the next request takes the full path");
        // A calm request whose answer never reached its end is looked at in full at once.
        let p = calm_plugin("{}");
        served(&p, A);
        let mut req = get(&p);
        assert!(req.calm);
        finish(&p, &mut req, 503, ResponseFlags::UPSTREAM_CONNECTION_FAILURE, B, 1);
        assert_eq!(p.host().metric("failures.connect_failure"), 1);
        assert!(!p.calm.borrow().is_calm());
    }

    #[test]
    fn another_workers_alarm_ends_the_calm_and_calm_returns_after_a_quiet_while() {
        let p = calm_plugin("{}");
        served(&p, A);
        assert!(get(&p).calm);
        // Another worker met trouble.
        let _ = store::increment(&p.host().store, store::ALARM_KEY);
        p.host().advance(TICK_MS);
        p.on_tick();
        assert!(get(&p).cluster.is_some() && get(&p).cluster.is_some(), "full path for every request");
        let mut t = 0;
        while !p.calm.borrow().is_calm() {
            p.host().advance(TICK_MS);
            p.on_tick();
            t += TICK_MS;
            assert!(t <= crate::calm::CALM_AFTER_MS + PERIODIC_MS, "still not calm after {t} ms");
        }
        assert!(t >= crate::calm::CALM_AFTER_MS - TICK_MS, "calm again after {t} ms");
    }

    #[test]
    fn a_table_that_needs_decisions_keeps_the_vm_off_the_calm_path() {
        let p = calm_plugin(STEERING);
        // Another worker ejected an endpoint, and its alarm was lost.
        let policy = Policy::from_config(&p.config);
        let now = p.host().clock_ms.get();
        let _ = store::update(&p.host().store, CLUSTER, now, |t| {
            let mut applied = Applied::default();
            for _ in 0..5 {
                let a = t.apply(&Observation::Failure(A, FailureKind::ConnectFailure), now, &policy, 0);
                applied.ejected.extend(a.ejected);
            }
            applied
        });
        assert!(table(&p).is_ejected(A, now));
        p.host().advance(PERIODIC_MS);
        p.on_tick();
        assert!(!p.calm.borrow().is_calm());
    }

    #[test]
    fn a_calm_request_left_unanswered_has_its_cluster_read_and_swept_and_a_silent_endpoint_ends_the_calm() {
        let p = calm_plugin(r#"{"endpointOverride":{"exploreRatio":0,"stallAfterMs":250}}"#);
        for a in [A, B] {
            served(&p, a); // full paths, one after each tick
            p.host().advance(TICK_MS);
            p.on_tick();
        }
        served(&p, A); // the tick's sample
        let mut hung = RequestState::new(42);
        p.host().set_map(Map::RequestHeaders, &[(":method", "GET")]);
        p.on_request_headers(&mut hung);
        assert!(hung.calm && hung.cluster.is_none());
        p.host().stream_properties.borrow_mut().insert((42, "xds.cluster_name".into()), CLUSTER.as_bytes().to_vec());
        p.host().advance(250);
        p.on_tick();
        assert!(p.host().dispatched.borrow().is_empty() && p.calm.borrow().is_calm(), "within the floor");
        p.host().advance(1);
        p.on_tick();
        let probed: Vec<String> = p.host().dispatched.borrow().iter().filter_map(|(_, h)| override_target(h)).collect();
        assert_eq!(probed.len(), 2, "the cluster it waits at is swept: {probed:?}");
        assert_eq!(p.host().metric("stall_sweeps"), 1);
        assert!(p.calm.borrow().is_calm(), "a slow request alone is no trouble");
        // One endpoint answers its probe, the other does not: that one is doubted, and
        // requests there are decided differently from now on, on every worker.
        // The fake host's call tokens count from 1.
        p.host().set_map(Map::ProbeResponseHeaders, &[(":status", "200")]);
        p.on_probe_response(1);
        assert!(p.calm.borrow().is_calm(), "an endpoint that answers is no trouble");
        p.host().set_map(Map::ProbeResponseHeaders, &[]);
        p.on_probe_response(2);
        assert!(!p.calm.borrow().is_calm());
        let next = get(&p);
        assert!(next.cluster.is_some() && next.watched.is_some(), "watched by cluster from now on");
        drop(hung);
    }

    #[test]
    fn an_answer_reset_after_its_headers_is_a_failure_despite_its_status() {
        let p = plugin("{}");
        learn(&p, &[A]);
        let mut req = get(&p);
        p.on_response_headers(&mut req, false);
        p.on_response_body(&mut req, false);
        finish(&p, &mut req, 200, ResponseFlags::UPSTREAM_REMOTE_RESET, A, 1);
        assert_eq!(p.host().metric("failures.reset"), 1);
        assert!(table(&p).find(A).is_some_and(|e| e.consecutive_gateway == 1 && !e.proven));
        // The same status and flag on an answer that reached its end: Envoy's flag can only
        // belong to something else (here, nothing), and the answer is a success.
        let mut req = get(&p);
        p.on_response_headers(&mut req, false);
        p.on_response_body(&mut req, true);
        finish(&p, &mut req, 200, ResponseFlags::UPSTREAM_REMOTE_RESET, A, 1);
        assert_eq!(p.host().metric("failures.reset"), 1);
    }

    #[test]
    fn without_steering_plain_successes_are_sampled_while_nothing_recovers() {
        let p = plugin("{}");
        learn(&p, &[A, B]);
        let address_reads = |p: &Plugin<FakeHost>| p.host().calls.borrow().get("get_property").copied().unwrap_or(0);
        // Within one sample period, only the first plain success is read where it was served.
        p.host().advance(SUCCESS_SAMPLE_MS);
        p.host().reset_calls();
        for _ in 0..5 {
            served(&p, C);
        }
        assert_eq!(address_reads(&p), 5 * 3 + 1, "cluster, status, attempts each; one address");
        assert!(table(&p).find(C).is_some_and(|e| e.proven));
        // A answers 503 once: from then on every success is read, so A's next success clears
        // its failure at once rather than when sampled.
        let mut req = get(&p);
        finish(&p, &mut req, 503, 0, A, 1);
        assert!(table(&p).find(A).is_some_and(|e| e.consecutive_gateway == 1));
        served(&p, B);
        served(&p, A);
        assert!(table(&p).find(A).is_some_and(|e| e.consecutive_gateway == 0));
        // Steering needs every endpoint that answered known: nothing is sampled.
        let p = plugin(STEERING);
        learn(&p, &[A, B]);
        p.host().advance(SUCCESS_SAMPLE_MS);
        p.host().reset_calls();
        for _ in 0..5 {
            served(&p, C);
        }
        assert_eq!(address_reads(&p), 5 * 4);
    }

    #[test]
    fn the_shared_table_is_read_once_per_refresh_period() {
        let p = plugin("{}");
        served(&p, A);
        p.host().reset_calls();
        for _ in 0..5 {
            p.host().advance(10);
            served(&p, A);
        }
        assert_eq!(p.host().calls.borrow().get("get_shared_data"), None, "cached for {TABLE_REFRESH_MS} ms");
        p.host().advance(TABLE_REFRESH_MS);
        served(&p, A);
        assert_eq!(p.host().calls.borrow().get("get_shared_data"), Some(&1));
    }

    #[test]
    fn retries_added_reaches_envoy_on_the_tick() {
        let p = plugin("{}");
        for _ in 0..3 {
            served(&p, A);
        }
        assert_eq!(p.host().metric("retries_added"), 0);
        p.on_tick();
        assert_eq!(p.host().metric("retries_added"), 3);
        assert_eq!(p.host().metric("known_endpoints"), 1);
    }

    /// Three endpoints learnt from answers, then C refuses a connection: ejected, steering on.
    fn steering_with_c_ejected() -> Plugin<FakeHost> {
        let p = plugin(STEERING);
        for a in [A, B, C] {
            served(&p, a);
        }
        let mut req = get(&p);
        finish(&p, &mut req, 503, ResponseFlags::UPSTREAM_CONNECTION_FAILURE, C, 1);
        assert!(table(&p).is_ejected(C, p.host().clock_ms.get()));
        p
    }

    #[test]
    fn steered_lists_avoid_ejected_endpoints_and_retried_entries_are_blamed() {
        let p = steering_with_c_ejected();
        let mut req = get(&p);
        assert_eq!(req.steered.len(), 2, "{:?}", req.steered);
        assert!(!req.steered.iter().any(|a| a == C));
        let header = p.host().map(Map::RequestHeaders);
        assert!(header.iter().any(|(k, v)| k == "x-gateway-destination-endpoint" && *v == req.steered.join(",")));
        let (first, second) = (req.steered[0].clone(), req.steered[1].clone());
        // One retry, answered by the second entry: the first failed an attempt.
        finish(&p, &mut req, 200, 0, &second, 2);
        assert_eq!(p.host().metric("failures.retried_attempt"), 1);
        let t = table(&p);
        assert!(t.find(&first).is_some_and(|e| !e.proven), "{:?}", t.find(&first));
        assert!(t.find(&second).is_some_and(|e| e.proven));
    }

    #[test]
    fn entries_skipped_before_the_first_attempt_are_forgotten() {
        let p = steering_with_c_ejected();
        let mut req = get(&p);
        let (first, second) = (req.steered[0].clone(), req.steered[1].clone());
        // No retry, yet the second entry answered: Envoy skipped the first, gone from EDS.
        finish(&p, &mut req, 200, 0, &second, 1);
        assert!(table(&p).find(&first).is_none());
        assert_eq!(p.host().metric("failures.retried_attempt"), 0, "nobody is blamed");
    }

    #[test]
    fn endpoints_back_from_ejection_are_probed_and_a_probe_answer_puts_them_first() {
        let p = steering_with_c_ejected();
        p.host().advance(p.config.ejection.base_ejection_ms + 1);
        p.on_tick();
        let dispatched = p.host().dispatched.borrow().clone();
        assert_eq!(dispatched.len(), 1, "{dispatched:?}");
        let (cluster, headers) = &dispatched[0];
        assert_eq!(cluster, CLUSTER);
        assert!(headers.contains(&("x-gateway-destination-endpoint".to_string(), C.to_string())));
        p.host().advance(PERIODIC_MS);
        p.on_tick();
        assert_eq!(p.host().dispatched.borrow().len(), 1, "one probe in flight per endpoint");

        p.host().set_map(Map::ProbeResponseHeaders, &[(":status", "200")]);
        p.on_probe_response(1);
        let e = table(&p).find(C).cloned();
        assert!(e.as_ref().is_some_and(|e| e.probe_answered && !e.proven), "{e:?}");
        // A real request finds out whether C is still in EDS.
        p.host().advance(TABLE_REFRESH_MS);
        let req = get(&p);
        assert_eq!(req.steered.first().map(String::as_str), Some(C), "{:?}", req.steered);
    }

    #[test]
    fn a_probe_answered_with_unavailable_ejects_again() {
        let p = steering_with_c_ejected();
        p.host().advance(p.config.ejection.base_ejection_ms + 1);
        p.on_tick();
        p.host().set_map(Map::ProbeResponseHeaders, &[(":status", "200"), ("grpc-status", "14")]);
        p.on_probe_response(1);
        assert!(table(&p).find(C).is_some_and(|e| !e.probe_answered && e.consecutive_gateway == 1));
        p.host().set_map(Map::ProbeResponseHeaders, &[(":status", "200"), ("grpc-status", "12")]);
        p.host().advance(PERIODIC_MS);
        p.on_tick();
        p.on_probe_response(2);
        assert!(table(&p).find(C).is_some_and(|e| e.probe_answered), "UNIMPLEMENTED: a server answered");
        p.on_probe_response(99);
    }

    #[test]
    fn a_request_left_unanswered_has_the_endpoints_probed_and_the_silent_one_is_doubted() {
        let p = plugin(r#"{"endpointOverride":{"exploreRatio":0,"stallAfterMs":250}}"#);
        for a in [A, B, C] {
            served(&p, a);
        }
        let hung = get(&p); // a pod that vanished keeps it: no answer, no failure
        p.host().advance(250);
        p.on_tick();
        assert!(p.host().dispatched.borrow().is_empty(), "within the 250 ms floor");
        p.host().advance(1);
        p.on_tick();
        let probed: Vec<String> = p.host().dispatched.borrow().iter().filter_map(|(_, h)| override_target(h)).collect();
        assert_eq!(probed.len(), 3, "{probed:?}");
        assert!(p.host().dispatch_timeouts.borrow().iter().all(|t| *t == 250), "as long as the stall floor");
        assert_eq!(p.host().metric("stall_sweeps"), 1);
        for (token, target) in (1u32..).zip(&probed) {
            let answer: &[(&str, &str)] = if target == C { &[] } else { &[(":status", "200")] };
            p.host().set_map(Map::ProbeResponseHeaders, answer);
            p.on_probe_response(token);
        }
        let t = table(&p);
        let c = t.find(C).cloned();
        assert!(c.as_ref().is_some_and(|e| !e.proven && !e.is_ejected(p.host().clock_ms.get())), "{c:?}");
        assert!(t.find(A).is_some_and(|e| e.proven) && t.find(B).is_some_and(|e| e.proven));
        // Steering is on, and puts the silent endpoint last.
        p.host().advance(TABLE_REFRESH_MS);
        let req = get(&p);
        assert_eq!(req.steered.last().map(String::as_str), Some(C), "{:?}", req.steered);
        assert_eq!(req.steered.len(), 3);
        // One sweep per interval, however long the request keeps waiting.
        p.host().advance(TICK_MS);
        p.on_tick();
        assert_eq!(p.host().metric("stall_sweeps"), 1);
        drop(hung);
    }

    fn per_try_timeout(p: &Plugin<FakeHost>) -> Option<String> {
        let sent = p.host().map(Map::RequestHeaders);
        sent.iter().find(|(k, _)| k == "x-envoy-upstream-rq-per-try-timeout-ms").map(|(_, v)| v.clone())
    }

    #[test]
    fn after_envoys_balancer_needed_several_retries_no_request_is_left_to_it_for_a_while() {
        use crate::inflight::{EXPLORATION_PAUSE_MS, STALE_LIST_RETRIES};
        let p = plugin(r#"{"endpointOverride":{"exploreRatio":1}}"#);
        served(&p, A);
        served(&p, B);
        let steered = |p: &Plugin<FakeHost>| {
            let mut req = get(p);
            let steered = !req.steered.is_empty();
            finish(p, &mut req, 200, 0, A, 1);
            steered
        };
        // One retry Envoy chose the endpoint for: the cluster is steered, but with every
        // request exploring, Envoy's balancer still gets them.
        let mut req = get(&p);
        finish(&p, &mut req, 200, 0, A, 2);
        assert!(!steered(&p));
        let mut req = get(&p);
        finish(&p, &mut req, 200, 0, A, STALE_LIST_RETRIES + 1);
        assert!(steered(&p), "most of Envoy's list looks dead: requests go to endpoints known alive");
        p.host().advance(EXPLORATION_PAUSE_MS);
        assert!(!steered(&p), "exploration resumes");
    }

    #[test]
    fn while_endpoints_are_found_silent_replayable_attempts_give_up_sooner() {
        let p =
            plugin(r#"{"endpointOverride":{"exploreRatio":0,"stallAfterMs":250},"retry":{"perTryTimeoutMs":5000}}"#);
        for a in [A, B, C] {
            served(&p, a);
        }
        let _ = get(&p);
        assert_eq!(per_try_timeout(&p).as_deref(), Some("5000"), "as configured while nothing is wrong");
        p.host().advance(251);
        p.on_tick();
        let probed: Vec<String> = p.host().dispatched.borrow().iter().filter_map(|(_, h)| override_target(h)).collect();
        for (token, target) in (1u32..).zip(&probed) {
            let answer: &[(&str, &str)] = if target == C { &[] } else { &[(":status", "200")] };
            p.host().set_map(Map::ProbeResponseHeaders, answer);
            p.on_probe_response(token);
        }
        let _ = get(&p);
        assert_eq!(per_try_timeout(&p).as_deref(), Some("1000"), "four stall thresholds");
        let _ = start(&p, &[(":method", "POST"), (":path", "/")]);
        assert_eq!(per_try_timeout(&p).as_deref(), Some("5000"), "a POST is not replayed after a timeout");
        p.host().advance(crate::inflight::SWEEP_ACTIVE_FOR_MS);
        let _ = get(&p);
        assert_eq!(per_try_timeout(&p).as_deref(), Some("5000"), "no silence found for ten seconds");
    }

    #[test]
    fn stalled_attempt_factor_zero_keeps_the_configured_per_try_timeout() {
        let p = plugin(
            r#"{"endpointOverride":{"exploreRatio":0,"stallAfterMs":250,"stalledAttemptFactor":0},"retry":{"perTryTimeoutMs":5000}}"#,
        );
        for a in [A, B, C] {
            served(&p, a);
        }
        let _ = get(&p);
        p.host().advance(251);
        p.on_tick();
        let probed = p.host().dispatched.borrow().len();
        p.host().set_map(Map::ProbeResponseHeaders, &[]);
        for token in 1..=u32::try_from(probed).unwrap_or_default() {
            p.on_probe_response(token);
        }
        let _ = get(&p);
        assert_eq!(per_try_timeout(&p).as_deref(), Some("5000"));
    }

    #[test]
    fn a_steered_request_left_unanswered_doubts_its_endpoint_at_once_and_steers_others_away() {
        let p = steering_with_c_ejected(); // steering on: A and B proven
        let hung = get(&p);
        let stuck = hung.steered.first().cloned().unwrap_or_default();
        let other = if stuck == A { B } else { A };
        // While it waits, the next request's first attempt goes to the endpoint with none waiting.
        let mut next = get(&p);
        assert_eq!(next.steered.first().map(String::as_str), Some(other), "{:?}", next.steered);
        p.on_response_headers(&mut next, true);
        finish(&p, &mut next, 200, 0, other, 1);
        p.host().advance(101);
        p.on_tick();
        let t = table(&p);
        assert!(t.find(&stuck).is_some_and(|e| !e.proven), "doubted without waiting for a probe: {:?}", t.find(&stuck));
        assert!(t.find(other).is_some_and(|e| e.proven));
        assert!(!t.is_ejected(&stuck, p.host().clock_ms.get()), "doubt is not an ejection");
    }

    #[test]
    fn a_request_whose_answer_began_is_not_a_stall() {
        let p = plugin(STEERING);
        served(&p, A);
        let mut streaming = get(&p);
        p.on_response_headers(&mut streaming, false);
        p.host().advance(60_000);
        p.on_tick();
        assert_eq!(p.host().metric("stall_sweeps"), 0);
        assert!(p.host().dispatched.borrow().is_empty());
    }

    fn sent(p: &Plugin<FakeHost>, name: &str) -> Option<String> {
        p.host().map(Map::RequestHeaders).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    const CLIENT_RETRIES: [(&str, &str); 5] = [
        (":method", "GET"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-max-retries", "50"),
        ("x-envoy-retry-grpc-on", "internal"),
        (STATUS_CODES_HEADER, "500"),
    ];

    #[test]
    fn a_clients_retry_headers_give_way_to_the_budgeted_policy_unless_clients_are_trusted() {
        // Budgeted: the filter's policy replaces the client's.
        let p = plugin("{}");
        let _ = start(&p, &CLIENT_RETRIES);
        assert_eq!(sent(&p, "x-envoy-max-retries").as_deref(), Some("10"));
        assert_eq!(sent(&p, "x-envoy-retry-on").as_deref(), Some("connect-failure,refused-stream,reset,gateway-error"));
        assert_eq!(sent(&p, STATUS_CODES_HEADER), None, "the client's codes were kept");
        // Budget spent: the client's are removed, not left to retry past it.
        let p = plugin(r#"{"retry":{"budget":{"ratio":0,"minRetriesPerSecond":0}}}"#);
        let _ = start(&p, &CLIENT_RETRIES);
        assert_eq!(p.host().metric("retries_denied_budget"), 1);
        for name in RETRY_HEADERS {
            assert_eq!(sent(&p, name), None, "{name} left to the client");
        }
        // A gRPC call is replayed on the configured statuses only.
        let p = plugin(r#"{"retry":{"grpcRetryOn":[]}}"#);
        let call = [(":method", "POST"), ("content-type", "application/grpc"), ("x-envoy-retry-grpc-on", "internal")];
        let _ = start(&p, &call);
        assert_eq!(sent(&p, "x-envoy-retry-grpc-on"), None);
        // Trusted (a mesh sets them on purpose): left alone, not even looked at again.
        let p = plugin(r#"{"trustClientHeaders":true}"#);
        let _ = start(&p, &CLIENT_RETRIES);
        assert_eq!(sent(&p, "x-envoy-max-retries").as_deref(), Some("50"));
        assert_eq!(sent(&p, "x-envoy-retry-on").as_deref(), Some("5xx"));
        assert_eq!(p.host().calls.borrow().get("set_map_value"), None);
        // Status codes alone are no retry policy: the filter's applies, the trusted header is left.
        let p = plugin(r#"{"trustClientHeaders":true}"#);
        let _ = start(&p, &[(":method", "GET"), (STATUS_CODES_HEADER, "500")]);
        assert_eq!(sent(&p, "x-envoy-max-retries").as_deref(), Some("10"));
        assert_eq!(sent(&p, STATUS_CODES_HEADER).as_deref(), Some("500"));
    }

    fn override_target(headers: &[(String, String)]) -> Option<String> {
        headers.iter().find(|(k, _)| k == "x-gateway-destination-endpoint").map(|(_, v)| v.clone())
    }

    #[test]
    fn grpc_calls_get_grpc_retries_and_unavailable_in_trailers_is_a_failure() {
        let p = plugin("{}");
        let grpc = [(":method", "POST"), ("content-type", "application/grpc+proto"), (":path", "/svc/Call")];
        let mut req = start(&p, &grpc);
        let sent = p.host().map(Map::RequestHeaders);
        let value = |name: &str| sent.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(value("x-envoy-retry-grpc-on").as_deref(), Some("cancelled,unavailable"));
        assert_eq!(value("x-envoy-retry-on").as_deref(), Some(crate::decision::RETRY_ON_UNSENT));
        assert_eq!(value("x-envoy-retriable-status-codes"), None);
        p.host().set_map(Map::ResponseHeaders, &[(":status", "200")]);
        p.on_response_headers(&mut req, false);
        p.host().set_map(Map::ResponseTrailers, &[("grpc-status", "14")]);
        p.on_response_trailers(&mut req);
        finish(&p, &mut req, 200, 0, A, 1);
        assert_eq!(p.host().metric("failures.gateway_error"), 1);
        // Trailers-only: the status comes in the headers.
        let mut req = start(&p, &grpc);
        p.host().set_map(Map::ResponseHeaders, &[(":status", "200"), ("grpc-status", "14")]);
        p.on_response_headers(&mut req, true);
        finish(&p, &mut req, 200, 0, A, 1);
        assert_eq!(p.host().metric("failures.gateway_error"), 2);
        // A plain GET answered 200 is a success whatever a grpc-status header says.
        let mut req = get(&p);
        p.host().set_map(Map::ResponseHeaders, &[("grpc-status", "14")]);
        p.on_response_headers(&mut req, true);
        finish(&p, &mut req, 200, 0, A, 1);
        assert_eq!(p.host().metric("failures.gateway_error"), 2);
    }

    #[test]
    fn client_steering_headers_are_removed_before_deciding() {
        let p = plugin(r#"{"endpointOverride":{},"fallback":{}}"#);
        let _ =
            start(&p, &[(":method", "GET"), ("x-gateway-destination-endpoint", C), ("x-churn-guard-fallback", "true")]);
        let sent = p.host().map(Map::RequestHeaders);
        assert!(!sent.iter().any(|(k, _)| k == "x-gateway-destination-endpoint" || k == "x-churn-guard-fallback"));
        assert_eq!(p.host().metric("client_headers_removed"), 2);
    }

    #[test]
    fn the_debug_header_reports_the_decision() {
        let p = steering_with_c_ejected();
        let mut req = get(&p);
        p.host().set_map(Map::ResponseHeaders, &[]);
        p.on_response_headers(&mut req, true);
        let headers = p.host().map(Map::ResponseHeaders);
        assert!(headers.is_empty(), "off unless configured");
        let p = plugin(r#"{"debugHeader":true}"#);
        let mut req = get(&p);
        p.on_response_headers(&mut req, true);
        let headers = p.host().map(Map::ResponseHeaders);
        let value = headers.iter().find(|(k, _)| k == DEBUG_HEADER).map(|(_, v)| v.as_str());
        assert_eq!(value, Some(format!("vm=1; cluster={CLUSTER}; ejected=; steered=; fallback=false").as_str()));
    }

    #[test]
    fn vm_ids_are_unique_among_workers() {
        let store = crate::store::MemoryStore::default();
        assert_eq!((allocate_vm_id(&store), allocate_vm_id(&store)), (1, 2));
    }
}
