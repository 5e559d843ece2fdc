//! What the filter needs from its host, as a trait: Envoy through proxy-wasm in production
//! (`filter.rs`), an in-memory fake in native and wasm32 unit tests. Every call reports failure
//! in its return value; none may panic.

use crate::store::SharedStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// Header maps of the stream being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
    ResponseTrailers,
    /// Headers of the answer to the probe being handled (`Plugin::on_probe_response`).
    ProbeResponseHeaders,
}

pub trait Host: SharedStore {
    fn now_ms(&self) -> u64;
    fn log(&self, level: Level, message: &str);
    /// Whether debug lines would be written: asked once per tick, not per request.
    fn debug_enabled(&self) -> bool;
    /// An Envoy attribute of the stream being served (`upstream.address`, ...), as encoded by
    /// proxy-wasm.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// An attribute of another stream, by its proxy-wasm context id (from the tick, when a
    /// request's cluster was not read when it began); `None` if that stream is gone.
    fn stream_property(&self, context_id: u32, path: &[&str]) -> Option<Vec<u8>>;
    fn header(&self, map: Map, name: &str) -> Option<String>;
    /// Sets (`Some`) or removes (`None`) a header; false if the host refused.
    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&self, id: u32, by: u64);
    fn record_metric(&self, id: u32, value: u64);
    /// Sends a GET to `cluster` with `headers`; the answer comes to `Plugin::on_probe_response`
    /// with the returned token.
    fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String>;
}

#[cfg(not(target_os = "wasi"))]
pub mod fake {
    //! An in-memory host that records what the filter did, and counts host calls.

    use super::*;
    use crate::store::{MemoryStore, SetError};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// Header pairs, in order.
    pub type Pairs = Vec<(String, String)>;

    #[derive(Default)]
    pub struct FakeHost {
        pub store: MemoryStore,
        pub clock_ms: Cell<u64>,
        pub debug: Cell<bool>,
        /// Attributes by dotted path, e.g. `upstream.address`.
        pub properties: RefCell<HashMap<String, Vec<u8>>>,
        /// Other streams' attributes, by context id and dotted path.
        pub stream_properties: RefCell<HashMap<(u32, String), Vec<u8>>>,
        pub maps: RefCell<HashMap<String, Pairs>>,
        pub logs: RefCell<Vec<(Level, String)>>,
        pub metric_names: RefCell<Vec<String>>,
        pub metric_values: RefCell<HashMap<u32, u64>>,
        /// Calls dispatched: (cluster, headers).
        pub dispatched: RefCell<Vec<(String, Pairs)>>,
        /// Their timeouts, in the same order.
        pub dispatch_timeouts: RefCell<Vec<u64>>,
        /// Host calls made, by name: what a request costs Envoy beyond the filter's own work.
        pub calls: RefCell<HashMap<&'static str, u32>>,
    }

    fn key(map: Map) -> String {
        format!("{map:?}")
    }

    impl FakeHost {
        fn count(&self, call: &'static str) {
            *self.calls.borrow_mut().entry(call).or_insert(0) += 1;
        }

        pub fn total_calls(&self) -> u32 {
            self.calls.borrow().values().sum()
        }

        pub fn reset_calls(&self) {
            self.calls.borrow_mut().clear();
        }

        pub fn advance(&self, ms: u64) {
            self.clock_ms.set(self.clock_ms.get() + ms);
        }

        pub fn set_property(&self, path: &str, value: &[u8]) {
            self.properties.borrow_mut().insert(path.to_string(), value.to_vec());
        }

        pub fn set_int(&self, path: &str, value: u64) {
            self.set_property(path, &value.to_le_bytes());
        }

        pub fn clear_properties(&self) {
            self.properties.borrow_mut().clear();
        }

        pub fn set_map(&self, map: Map, pairs: &[(&str, &str)]) {
            let pairs = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            self.maps.borrow_mut().insert(key(map), pairs);
        }

        pub fn map(&self, map: Map) -> Vec<(String, String)> {
            self.maps.borrow().get(&key(map)).cloned().unwrap_or_default()
        }

        /// A metric's value by its name without the `churn_guard.` prefix.
        pub fn metric(&self, name: &str) -> u64 {
            let full = format!("churn_guard.{name}");
            let id = self.metric_names.borrow().iter().position(|n| *n == full);
            id.and_then(|i| u32::try_from(i).ok())
                .and_then(|i| self.metric_values.borrow().get(&i).copied())
                .unwrap_or(0)
        }

        pub fn logged(&self, needle: &str) -> bool {
            self.logs.borrow().iter().any(|(_, l)| l.contains(needle))
        }
    }

    impl SharedStore for FakeHost {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.count("get_shared_data");
            self.store.get(key)
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            self.count("set_shared_data");
            self.store.set(key, value, cas)
        }
    }

    impl Host for FakeHost {
        fn now_ms(&self) -> u64 {
            self.count("get_current_time");
            self.clock_ms.get()
        }

        fn log(&self, level: Level, message: &str) {
            self.count("log");
            self.logs.borrow_mut().push((level, message.to_string()));
        }

        fn debug_enabled(&self) -> bool {
            self.count("get_log_level");
            self.debug.get()
        }

        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.count("get_property");
            self.properties.borrow().get(&path.join(".")).cloned()
        }

        fn stream_property(&self, context_id: u32, path: &[&str]) -> Option<Vec<u8>> {
            self.count("get_property");
            self.stream_properties.borrow().get(&(context_id, path.join("."))).cloned()
        }

        fn header(&self, map: Map, name: &str) -> Option<String> {
            self.count("get_map_value");
            self.map(map).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
        }

        fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool {
            self.count("set_map_value");
            let mut maps = self.maps.borrow_mut();
            let pairs = maps.entry(key(map)).or_default();
            pairs.retain(|(k, _)| k != name);
            if let Some(v) = value {
                pairs.push((name.to_string(), v.to_string()));
            }
            true
        }

        fn define_metric(&self, _kind: MetricKind, name: &str) -> Option<u32> {
            let mut names = self.metric_names.borrow_mut();
            names.push(name.to_string());
            u32::try_from(names.len() - 1).ok()
        }

        fn increment_metric(&self, id: u32, by: u64) {
            self.count("increment_metric");
            *self.metric_values.borrow_mut().entry(id).or_insert(0) += by;
        }

        fn record_metric(&self, id: u32, value: u64) {
            self.count("record_metric");
            self.metric_values.borrow_mut().insert(id, value);
        }

        fn dispatch(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String> {
            self.count("dispatch_http_call");
            self.dispatch_timeouts.borrow_mut().push(timeout_ms);
            let mut d = self.dispatched.borrow_mut();
            d.push((cluster.to_string(), headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
            u32::try_from(d.len()).map_err(|e| e.to_string())
        }
    }
}
