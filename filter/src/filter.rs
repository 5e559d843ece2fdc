//! proxy-wasm glue: reads what Envoy exposes, asks the pure modules what to do, and applies it.
//!
//! Host calls go through `proxy_wasm::hostcalls` directly, whose results are `Result`s: the
//! SDK's trait helpers unwrap host errors, and a panic here would kill the VM and fail traffic.

use crate::budget::RetryBudget;
use crate::clusters::ClusterMap;
use crate::config::Config;
use crate::decision::{decide, RequestFacts};
use crate::health::{attribute_steered, Applied, ClusterTable, Observation, Policy, Steered};
use crate::outcome::{classify, effective_status, FailureKind, Outcome, ResponseFlags};
use crate::properties;
use crate::rng::Rng;
use crate::store::{self, SetError, SharedStore};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("churn-guard: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Tables read from shared data are reused for this long before being read again. Local writes
/// refresh the cache at once; other workers' ejections arrive within this delay.
const TABLE_REFRESH_MS: u64 = 100;
const MAX_CACHED_CLUSTERS: usize = 1024;
const VM_SEQUENCE_KEY: &str = "churn-guard.v1.vm-sequence";
const RETRY_HEADERS: [&str; 3] = ["x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries"];
const DEBUG_HEADER: &str = "x-churn-guard";
/// Probes sent per cluster and tick (one second), per worker.
const PROBES_PER_TICK: usize = 8;

mod host {
    use super::*;

    pub fn log(level: LogLevel, message: &str) {
        let _ = hostcalls::log(level, message);
    }

    pub fn debug_enabled() -> bool {
        matches!(hostcalls::get_log_level(), Ok(LogLevel::Trace | LogLevel::Debug))
    }

    pub fn now_ms() -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn property(path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    pub fn property_string(path: &[&str]) -> Option<String> {
        property(path).and_then(properties::string)
    }

    pub fn property_int(path: &[&str]) -> Option<u64> {
        property(path).and_then(|b| properties::int(&b))
    }

    pub fn request_headers() -> Vec<(String, String)> {
        hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    pub fn set_header(map: MapType, name: &str, value: &str) -> bool {
        match hostcalls::set_map_value(map, name, Some(value)) {
            Ok(()) => true,
            Err(status) => {
                log(LogLevel::Warn, &format!("churn-guard: could not set header {name}: {status:?}"));
                false
            }
        }
    }

    pub fn remove_header(map: MapType, name: &str) -> bool {
        match hostcalls::set_map_value(map, name, None) {
            Ok(()) => true,
            Err(status) => {
                log(LogLevel::Warn, &format!("churn-guard: could not remove header {name}: {status:?}"));
                false
            }
        }
    }

    /// The cluster the request is routed to: known once the route is resolved.
    pub fn cluster_name() -> Option<String> {
        property_string(&["xds", "cluster_name"]).or_else(|| property_string(&["cluster_name"]))
    }
}

/// proxy-wasm shared data: one store for all worker VMs with the same vm_id.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|s| match s {
            Status::CasMismatch => SetError::CasMismatch,
            _ => SetError::Host,
        })
    }
}

/// Envoy stats, named `wasmcustom.churn_guard.*` in `/stats`. Counters from all workers add up.
#[derive(Default)]
struct Metrics {
    ejections: Option<u32>,
    /// Incremented on nearly every request: counted here, handed to Envoy once per tick.
    retries_added: Batched,
    retries_denied: Option<u32>,
    retries_performed: Option<u32>,
    steered: Option<u32>,
    fallbacks: Option<u32>,
    client_headers_removed: Option<u32>,
    no_upstream: Option<u32>,
    failures: [Option<u32>; FailureKind::ALL.len()],
    ejected_endpoints: Option<u32>,
    known_endpoints: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let counter = |name: &str| define(MetricType::Counter, name);
        Self {
            ejections: counter("churn_guard.ejections"),
            retries_added: Batched { id: counter("churn_guard.retries_added"), pending: Cell::new(0) },
            retries_denied: counter("churn_guard.retries_denied_budget"),
            retries_performed: counter("churn_guard.retries_performed"),
            steered: counter("churn_guard.steered"),
            fallbacks: counter("churn_guard.fallbacks"),
            client_headers_removed: counter("churn_guard.client_headers_removed"),
            no_upstream: counter("churn_guard.no_healthy_upstream"),
            failures: FailureKind::ALL.map(|k| counter(&format!("churn_guard.failures.{}", k.name()))),
            ejected_endpoints: define(MetricType::Gauge, "churn_guard.ejected_endpoints"),
            known_endpoints: define(MetricType::Gauge, "churn_guard.known_endpoints"),
        }
    }

    fn failure(&self, kind: FailureKind) -> Option<u32> {
        let idx = FailureKind::ALL.iter().position(|k| *k == kind)?;
        self.failures.get(idx).copied().flatten()
    }
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            host::log(LogLevel::Warn, &format!("churn-guard: could not define metric {name}: {status:?}"));
            None
        }
    }
}

/// A counter bumped in the VM and flushed to Envoy by `flush`, to spare a host call per request.
#[derive(Default)]
struct Batched {
    id: Option<u32>,
    pending: Cell<u64>,
}

impl Batched {
    fn add(&self, by: u64) {
        self.pending.set(self.pending.get().saturating_add(by));
    }

    fn flush(&self) {
        inc(self.id, self.pending.replace(0));
    }
}

fn inc(metric: Option<u32>, by: u64) {
    if let (Some(id), true) = (metric, by > 0) {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

fn record(metric: Option<u32>, value: usize) {
    if let Some(id) = metric {
        let _ = hostcalls::record_metric(id, value as u64);
    }
}

struct CachedTable {
    table: ClusterTable,
    fetched_ms: u64,
}

/// Per-VM state shared by the root context and its HTTP contexts; replaced on reconfiguration.
struct Plugin {
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
    /// Probes in flight: call token → (cluster, endpoint).
    probes: RefCell<HashMap<u32, (String, String)>>,
    /// Clusters this VM has seen listed in the shared registry (`store::CLUSTERS_KEY`).
    registered: RefCell<HashSet<String>>,
    /// The registry was full once; said once per VM, not per request.
    registry_full_logged: Cell<bool>,
}

impl Plugin {
    fn new(config: Config, vm_id: u32) -> Self {
        let seed = host::now_ms() ^ (u64::from(vm_id) << 48);
        Self {
            debug: Cell::new(host::debug_enabled()),
            policy: Policy::from_config(&config),
            budgets: RefCell::new(ClusterMap::new(MAX_CACHED_CLUSTERS)),
            config,
            metrics: Metrics::define(),
            vm_id,
            rng: RefCell::new(Rng::new(seed)),
            tables: RefCell::new(ClusterMap::new(MAX_CACHED_CLUSTERS)),
            probes: RefCell::new(HashMap::new()),
            registered: RefCell::new(HashSet::new()),
            registry_full_logged: Cell::new(false),
        }
    }

    /// Counts an original request to `cluster` and returns the retries its budget allows now.
    fn budget_deposit(&self, cluster: &str, now_ms: u64) -> u32 {
        let mut budgets = self.budgets.borrow_mut();
        match budgets.get_or_insert_with(cluster, now_ms, || RetryBudget::new(&self.config.retry.budget)) {
            Some(b) => {
                b.deposit(now_ms);
                b.available(now_ms)
            }
            None => 0,
        }
    }

    fn budget_withdraw(&self, cluster: &str, now_ms: u64, retries: u32) {
        if let Some(b) = self.budgets.borrow_mut().get_mut(cluster, now_ms) {
            b.withdraw(now_ms, retries);
        }
    }

    fn with_table<R>(&self, cluster: &str, now_ms: u64, f: impl FnOnce(&ClusterTable) -> R) -> R {
        let mut tables = self.tables.borrow_mut();
        let fresh =
            tables.get_mut(cluster, now_ms).is_some_and(|c| now_ms.saturating_sub(c.fetched_ms) < TABLE_REFRESH_MS);
        if !fresh {
            let table = store::load(&HostStore, cluster);
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
        let empty = || CachedTable { table: ClusterTable::default(), fetched_ms: now_ms };
        if let Some(cached) = tables.get_or_insert_with(cluster, now_ms, empty) {
            *cached = CachedTable { table, fetched_ms: now_ms };
        }
    }

    /// Records observations of one finished request in the shared table.
    fn observe(&self, cluster: &str, observations: &[Observation<'_>], now_ms: u64) {
        let suspect_ms = self.config.endpoint_override.as_ref().map_or(0, |o| o.suspect_ms);
        let needed = self.with_table(cluster, now_ms, |t| observations.iter().any(|o| t.would_change(o, now_ms)));
        if !needed {
            return;
        }
        let result = store::update(&HostStore, cluster, now_ms, |table| {
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
                inc(self.metrics.ejections, applied.ejected.len() as u64);
                if self.debug.get() {
                    for (address, ms) in &applied.ejected {
                        host::log(
                            LogLevel::Debug,
                            &format!("churn-guard: ejected {address} of cluster {cluster} for {ms} ms"),
                        );
                    }
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
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "churn-guard: {} clusters already have shared state; cluster {cluster} and others get none \
                         until some expire",
                        store::MAX_CLUSTERS
                    ),
                );
            }
            return;
        }
        host::log(LogLevel::Warn, &format!("churn-guard: could not record observation for cluster {cluster}: {e:?}"));
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
                if self.probes.borrow().values().any(|(c, a)| *c == cluster && *a == target) {
                    continue;
                }
                let headers = vec![
                    (":method", "GET"),
                    (":path", o.probe_path.as_str()),
                    (":authority", "churn-guard-probe"),
                    (o.header.as_str(), target.as_str()),
                ];
                let timeout = Duration::from_millis(o.probe_timeout_ms);
                match hostcalls::dispatch_http_call(&cluster, headers, None, vec![], timeout) {
                    Ok(token) => {
                        self.probes.borrow_mut().insert(token, (cluster.clone(), target));
                    }
                    Err(status) => host::log(
                        LogLevel::Warn,
                        &format!("churn-guard: cannot probe {target} of cluster {cluster}: {status:?}"),
                    ),
                }
            }
        }
    }

    fn probe_answered(&self, token: u32) {
        let Some((cluster, address)) = self.probes.borrow_mut().remove(&token) else { return };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        // A gRPC server answers any path, `/` included, with HTTP 200 and a `grpc-status`:
        // UNIMPLEMENTED (501) still shows a server that answers; UNAVAILABLE (503) does not.
        let status = status.map(|code| effective_status(code, grpc_status(MapType::HttpCallResponseHeaders)));
        let observation = match status {
            Some(code) if code < 500 || code == 501 => Observation::ProbeAnswered(&address),
            Some(_) => Observation::Failure(&address, FailureKind::GatewayError),
            // No response at all: the connection failed or the probe timed out.
            None => Observation::Failure(&address, FailureKind::ConnectFailure),
        };
        if self.debug.get() {
            host::log(LogLevel::Debug, &format!("churn-guard: probe of {address} ({cluster}): {status:?}"));
        }
        self.observe(&cluster, &[observation], host::now_ms());
    }

    /// Keeps `cluster` listed in shared data, so that every VM's gauges include it: creating its
    /// table lists it, but it may have expired since while this VM still routes to it.
    fn register(&self, cluster: &str, now_ms: u64) {
        let mut registered = self.registered.borrow_mut();
        if registered.contains(cluster) || registered.len() >= store::MAX_CLUSTERS {
            return;
        }
        match store::register(&HostStore, cluster, now_ms) {
            Ok(()) => {
                registered.insert(cluster.to_string());
            }
            Err(e) => {
                drop(registered);
                self.store_error(cluster, e);
            }
        }
    }

    /// Once per tick: gauges over every cluster with a table in shared data, not just those this
    /// VM has served (all VMs, including the main thread's, which serves none, then report the
    /// same figures); shared state of clusters nobody routed to for the TTL is removed, and so is
    /// this VM's own.
    fn housekeeping(&self, now_ms: u64) {
        self.metrics.retries_added.flush();
        let ttl = self.config.ejection.endpoint_ttl_ms;
        let (mut ejected, mut known) = (0, 0);
        let listed = store::clusters(&HostStore);
        for cluster in &listed {
            let cached = self.tables.borrow().contains(cluster);
            let (e, k, expired) = if cached {
                self.with_table(cluster, now_ms, |t| {
                    let (e, k) = t.counts(now_ms, ttl);
                    (e, k, t.is_expired(now_ms, ttl))
                })
            } else {
                let t = store::load(&HostStore, cluster);
                let (e, k) = t.counts(now_ms, ttl);
                (e, k, t.is_expired(now_ms, ttl))
            };
            ejected += e;
            known += k;
            if expired {
                match store::retire(&HostStore, cluster, now_ms, ttl) {
                    Ok(true) => {
                        self.tables.borrow_mut().remove(cluster);
                        if self.debug.get() {
                            host::log(LogLevel::Debug, &format!("churn-guard: cluster {cluster} expired"));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => host::log(LogLevel::Warn, &format!("churn-guard: could not expire {cluster}: {e:?}")),
                }
            }
        }
        record(self.metrics.ejected_endpoints, ejected);
        record(self.metrics.known_endpoints, known);
        // Listed again by the next observation if another VM removed it from the registry.
        self.registered.borrow_mut().retain(|c| listed.contains(c));
        self.tables.borrow_mut().expire(now_ms, ttl);
        self.budgets.borrow_mut().expire(now_ms, ttl);
    }
}

#[derive(Default)]
struct Root {
    plugin: Option<Rc<Plugin>>,
    vm_id: Option<u32>,
}

impl Root {
    /// A small number unique to this VM among the workers, for the debug header.
    fn vm_id(&mut self) -> u32 {
        if let Some(id) = self.vm_id {
            return id;
        }
        let id = (0..store::MAX_CAS_ATTEMPTS)
            .find_map(|_| {
                let (bytes, cas) = HostStore.get(VM_SEQUENCE_KEY);
                let current = bytes.and_then(|b| properties::int(&b)).unwrap_or(0);
                let next = current.wrapping_add(1);
                HostStore.set(VM_SEQUENCE_KEY, &next.to_le_bytes(), cas).ok().map(|()| next)
            })
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        self.vm_id = Some(id);
        id
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, _body_size: usize, _num_trailers: usize) {
        if let Some(plugin) = &self.plugin {
            plugin.probe_answered(token_id);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                host::log(LogLevel::Error, &format!("churn-guard: cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                if let Err(e) = store::ensure_registry(&HostStore) {
                    host::log(LogLevel::Warn, &format!("churn-guard: cannot create the cluster registry: {e:?}"));
                }
                let vm_id = self.vm_id();
                self.plugin = Some(Rc::new(Plugin::new(config, vm_id)));
                if let Err(status) = hostcalls::set_tick_period(Duration::from_secs(1)) {
                    host::log(LogLevel::Warn, &format!("churn-guard: no tick, gauges stay stale: {status:?}"));
                }
                host::log(LogLevel::Info, "churn-guard: configured");
                true
            }
            Err(e) => {
                host::log(LogLevel::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(plugin) = &self.plugin {
            plugin.debug.set(host::debug_enabled());
            let now = host::now_ms();
            plugin.housekeeping(now);
            plugin.probe(now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(Request { plugin, cluster: None, steered: Vec::new(), fell_back: false, grpc_status: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    plugin: Rc<Plugin>,
    /// Cluster the request was first routed to, and the endpoints it was steered to there.
    cluster: Option<String>,
    steered: Vec<String>,
    /// The fallback header was set: the request left `cluster` for the fallback route.
    fell_back: bool,
    /// `grpc-status` of a gRPC call's answer: `Some` once seen, in the headers of a
    /// trailers-only answer or in the trailers. `None` for anything else.
    grpc_status: Option<Option<u32>>,
}

/// Reads `grpc-status` from a gRPC call's response headers or trailers.
fn grpc_status(map: MapType) -> Option<u32> {
    hostcalls::get_map_value(map, "grpc-status").ok().flatten().and_then(|s| s.parse().ok())
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let p = Rc::clone(&self.plugin);
        let now = host::now_ms();
        // Before the route is looked at: a client's fallback header would have chosen it.
        // One host call for every header the decision looks at, rather than one per header.
        let headers = host::request_headers();
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let mut removed = 0;
        for name in p.config.untrusted_headers() {
            if header(name).is_some() && host::remove_header(MapType::HttpRequestHeaders, name) {
                removed += 1;
            }
        }
        inc(p.metrics.client_headers_removed, removed);
        let Some(cluster) = host::cluster_name() else { return Action::Continue };
        let method = header(":method").unwrap_or_default();
        let grpc = method == "POST" && header("content-type").is_some_and(|t| t.starts_with("application/grpc"));
        if grpc {
            self.grpc_status = Some(None);
        }
        let facts = RequestFacts {
            grpc,
            method,
            has_retry_headers: RETRY_HEADERS.iter().any(|h| header(h).is_some()),
            // Someone trusted steers this request already.
            has_override_header: p.config.trust_client_headers
                && p.config.endpoint_override.as_ref().is_some_and(|o| header(&o.header).is_some()),
        };
        let available = p.budget_deposit(&cluster, now);
        let decision =
            p.with_table(&cluster, now, |t| decide(&p.config, &facts, t, now, available, &mut p.rng.borrow_mut()));

        let request = MapType::HttpRequestHeaders;
        if let Some(plan) = &decision.retry {
            let mut ok = host::set_header(request, "x-envoy-retry-on", plan.retry_on)
                && host::set_header(request, "x-envoy-max-retries", &plan.max_retries.to_string());
            if let Some(codes) = plan.status_codes {
                ok &= host::set_header(request, "x-envoy-retriable-status-codes", codes);
            }
            if let Some(conditions) = plan.grpc_retry_on {
                ok &= host::set_header(request, "x-envoy-retry-grpc-on", conditions);
            }
            if let Some(ms) = plan.per_try_timeout_ms {
                ok &= host::set_header(request, "x-envoy-upstream-rq-per-try-timeout-ms", &ms.to_string());
            }
            if ok {
                p.metrics.retries_added.add(1);
            }
        }
        if decision.budget_exhausted {
            inc(p.metrics.retries_denied, 1);
        }
        if let (false, Some(o)) = (decision.steer.is_empty(), &p.config.endpoint_override) {
            if host::set_header(request, &o.header, &decision.steer.join(",")) {
                inc(p.metrics.steered, 1);
                self.steered = decision.steer;
            }
        }
        // Last, because Envoy re-resolves the route when a request header changes.
        if let (true, Some(f)) = (decision.fallback, &p.config.fallback) {
            if host::set_header(request, &f.header, &f.value) {
                inc(p.metrics.fallbacks, 1);
                self.fell_back = true;
            }
        }
        if p.debug.get() {
            host::log(
                LogLevel::Debug,
                &format!(
                    "churn-guard: {method} cluster={cluster} retries={} steer=[{}] fallback={}",
                    decision.retry.as_ref().map_or(0, |r| r.max_retries),
                    self.steered.join(","),
                    decision.fallback
                ),
            );
        }
        self.cluster = Some(cluster);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(status) = &mut self.grpc_status {
            // Trailers-only: the call's status is in the headers.
            *status = grpc_status(MapType::HttpResponseHeaders);
        }
        let p = &self.plugin;
        if !p.config.debug_header {
            return Action::Continue;
        }
        // Report on the cluster the route chose first: after a fallback, that is the stale one.
        let Some(routed) = self.cluster.clone().or_else(host::cluster_name) else { return Action::Continue };
        let now = host::now_ms();
        let ejected = p.with_table(&routed, now, |t| t.ejected_addresses(now).collect::<Vec<_>>().join(","));
        let value = format!(
            "vm={}; cluster={routed}; ejected={ejected}; steered={}; fallback={}",
            p.vm_id,
            self.steered.join(","),
            self.fell_back,
        );
        host::set_header(MapType::HttpResponseHeaders, DEBUG_HEADER, &value);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(status) = &mut self.grpc_status {
            *status = grpc_status(MapType::HttpResponseTrailers).or(*status);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let p = Rc::clone(&self.plugin);
        // The route only changes cluster when the fallback header re-routed it.
        // on_log is the request's last callback: take the name rather than copy it.
        let routed = self.cluster.take();
        let cluster = match (&routed, self.fell_back) {
            (Some(c), false) => c.clone(),
            _ => match host::cluster_name() {
                Some(c) => c,
                None => return,
            },
        };
        let http_status = host::property_int(&["response", "code"]).unwrap_or(0);
        let status = effective_status(u32::try_from(http_status).unwrap_or(0), self.grpc_status.flatten());
        // Read whatever the status: a stream the endpoint reset after its answer began (a gRPC
        // stream, a long body) has a 200 and a reset flag.
        let flags = ResponseFlags(host::property_int(&["response", "flags"]).unwrap_or(0));
        let address = host::property_string(&["upstream", "address"]).filter(|a| properties::is_ip_endpoint(a));
        let attempts = host::property_int(&["upstream", "request_attempt_count"]).unwrap_or(1);
        let retries = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
        let now = host::now_ms();
        // Charged where the request was routed first: that cluster's budget granted the retries.
        p.budget_withdraw(routed.as_deref().unwrap_or(&cluster), now, retries);
        inc(p.metrics.retries_performed, u64::from(retries));

        let outcome = classify(status, flags, address.is_some());
        let mut observations = Vec::with_capacity(self.steered.len() + 2);
        let steered_here = !self.steered.is_empty() && !self.fell_back;
        let mut attributed = 0u32;
        if let (true, Some(addr)) = (steered_here, &address) {
            match attribute_steered(&self.steered, addr, attempts) {
                Steered::Failed(failed) => {
                    inc(p.metrics.failure(FailureKind::RetriedAttempt), failed.len() as u64);
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
                inc(p.metrics.failure(kind), 1);
                observations.push(Observation::Failure(addr, kind));
            }
            (Outcome::NoUpstream, _) => {
                inc(p.metrics.no_upstream, 1);
                observations.push(Observation::NoUpstream);
            }
            _ => {}
        }
        // Retries whose endpoints are not known: steer until they are.
        if retries > attributed && p.config.endpoint_override.is_some() {
            observations.push(Observation::Unattributed);
        }
        if !observations.is_empty() {
            p.observe(&cluster, &observations, now);
        }
    }
}
