//! proxy-wasm glue: the `Host` trait over Envoy's host calls, and proxy-wasm's callbacks handed
//! to `Plugin`.
//!
//! Host calls go through `proxy_wasm::hostcalls` directly, whose results are `Result`s: the
//! SDK's trait helpers unwrap host errors, and a panic here would kill the VM and fail traffic.

use crate::config::Config;
use crate::host::{Host, Level, Map, MetricKind};
use crate::plugin::{allocate_vm_id, Plugin, RequestState};
use crate::store::{self, SetError, SharedStore};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("churn-guard: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, ..Root::default() })
    });
}}

/// Envoy, through proxy-wasm host calls, for the stream or root context being served.
/// `root_context_id` is the plugin's root context, which the tick's calls return to after
/// reading another stream's attributes.
#[derive(Clone, Copy)]
struct Envoy {
    root_context_id: u32,
}

fn map_type(map: Map) -> MapType {
    match map {
        Map::RequestHeaders => MapType::HttpRequestHeaders,
        Map::ResponseHeaders => MapType::HttpResponseHeaders,
        Map::ResponseTrailers => MapType::HttpResponseTrailers,
        Map::ProbeResponseHeaders => MapType::HttpCallResponseHeaders,
    }
}

/// proxy-wasm shared data: one store for all worker VMs with the same vm_id.
impl SharedStore for Envoy {
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

impl Host for Envoy {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(level, message);
    }

    fn debug_enabled(&self) -> bool {
        matches!(hostcalls::get_log_level(), Ok(LogLevel::Trace | LogLevel::Debug))
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn stream_property(&self, context_id: u32, path: &[&str]) -> Option<Vec<u8>> {
        // Fails if the stream has ended since.
        hostcalls::set_effective_context(context_id).ok()?;
        let value = hostcalls::get_property(path.to_vec()).ok().flatten();
        // Probes sent later in this tick must come from the root context, which gets their
        // answers.
        if let Err(status) = hostcalls::set_effective_context(self.root_context_id) {
            self.log(Level::Error, &format!("churn-guard: cannot return to the root context: {status:?}"));
        }
        value
    }

    fn header(&self, map: Map, name: &str) -> Option<String> {
        hostcalls::get_map_value(map_type(map), name).ok().flatten()
    }

    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool {
        hostcalls::set_map_value(map_type(map), name, value).is_ok()
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment_metric(&self, id: u32, by: u64) {
        let _ = hostcalls::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }

    fn record_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], Duration::from_millis(timeout_ms))
            .map_err(|status| format!("{status:?}"))
    }
}

#[derive(Default)]
struct Root {
    context_id: u32,
    plugin: Option<Rc<Plugin<Envoy>>>,
    vm_id: Option<u32>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, _body_size: usize, _num_trailers: usize) {
        if let Some(plugin) = &self.plugin {
            plugin.on_probe_response(token_id);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let envoy = Envoy { root_context_id: self.context_id };
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, plugin_configuration_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(status) => {
                envoy.log(Level::Error, &format!("churn-guard: cannot read plugin configuration: {status:?}"));
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                if let Err(e) = store::ensure_registry(&envoy) {
                    envoy.log(Level::Warn, &format!("churn-guard: cannot create the cluster registry: {e:?}"));
                }
                let vm_id = *self.vm_id.get_or_insert_with(|| allocate_vm_id(&envoy));
                self.plugin = Some(Rc::new(Plugin::new(envoy, config, vm_id)));
                if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(crate::plugin::TICK_MS)) {
                    envoy.log(Level::Warn, &format!("churn-guard: no tick, gauges stay stale: {status:?}"));
                }
                envoy.log(Level::Info, "churn-guard: configured");
                true
            }
            Err(e) => {
                envoy.log(Level::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(plugin) = &self.plugin {
            plugin.on_tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(Request { plugin, state: RequestState::new(context_id) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    plugin: Rc<Plugin<Envoy>>,
    state: RequestState,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.plugin.on_request_headers(&mut self.state);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.plugin.on_response_headers(&mut self.state, end_of_stream);
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        self.plugin.on_response_body(&mut self.state, end_of_stream);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.plugin.on_response_trailers(&mut self.state);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.plugin.on_log(&mut self.state);
    }
}
