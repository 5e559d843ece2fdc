//! Envoy configuration shaped like what Envoy Gateway generates (see
//! `tests/fixtures/envoy-gateway/xds-samples/`, checked by
//! `bench/tests/envoy_gateway_shape.rs`): the Wasm filter disabled on the listener and enabled
//! per route, loaded from a remote HTTP source pinned by sha256, before the router; EDS clusters
//! with least-request balancing, or `override_host` for `loadBalancer.endpointOverride`; no route
//! retry policy unless a BackendTrafficPolicy would add one.
//!
//! xDS is served from files (`path_config_source`), rewritten atomically, so tests can change
//! endpoints and listeners while Envoy runs, as a control plane would.

use anyhow::Context as _;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const LISTENER: &str = "envoy-gateway/gateway-1/http";
pub const ROUTE_CONFIG: &str = "envoy-gateway/gateway-1/http";
pub const PRIMARY: &str = "httproute/default/backend/rule/0";
pub const FALLBACK: &str = "httproute/default/backend-fallback/rule/0";
pub const WASM_CLUSTER: &str = "wasm_cluster";
pub const FILTER: &str = "envoy.filters.http.wasm/envoyextensionpolicy/default/churn-guard/wasm/0";
pub const VM_ID: &str = "envoyextensionpolicy/default/churn-guard/wasm/0";

/// Where Envoy fetches the Wasm module, as Envoy Gateway's `type: HTTP` or image code source.
#[derive(Debug, Clone)]
pub struct WasmSource {
    pub url: String,
    pub sha256: String,
    /// The `wasm_cluster` endpoint serving `url`.
    pub server: SocketAddr,
    /// For an `https://` url: the CA (PEM) the server's certificate must chain to, as a code
    /// source's `tls.caCertificateRef` names it. Envoy then checks the certificate against it
    /// and the url's host.
    pub tls_ca: Option<String>,
}

/// The upstream TLS of `wasm_cluster` for `source`: trusts only `ca`, and wants a certificate
/// naming the url's host, sent as SNI.
fn wasm_tls(source: &WasmSource, ca: &str) -> Value {
    let authority = source.url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let san_type = if host.parse::<std::net::IpAddr>().is_ok() { "IP_ADDRESS" } else { "DNS" };
    json!({
        "name": "envoy.transport_sockets.tls",
        "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "commonTlsContext": {"validationContext": {
                "trustedCa": {"inlineString": ca},
                "matchTypedSubjectAltNames": [{"sanType": san_type, "matcher": {"exact": host}}]
            }}
        }
    })
}

/// Which plugin configuration to load, if any.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub source: WasmSource,
    /// The plugin configuration, as in `EnvoyExtensionPolicy.spec.wasm[].config`.
    pub config: String,
}

/// A Service-routed fallback rule: requests with `header: value` go to `FALLBACK`.
#[derive(Debug, Clone)]
pub struct FallbackRoute {
    pub header: String,
    pub value: String,
}

/// One gateway: a listener, a route and the primary cluster, plus what the test varies.
#[derive(Debug, Clone, Default)]
pub struct GatewaySpec {
    pub filter: Option<FilterSpec>,
    /// `loadBalancer.endpointOverride.extractFrom[].header`: the primary cluster uses `override_host`.
    pub endpoint_override_header: Option<String>,
    pub fallback: Option<FallbackRoute>,
    /// A route `retryPolicy` (BackendTrafficPolicy `retry`), for baselines.
    pub route_retry_policy: Option<Value>,
    /// Cluster `outlierDetection` (BackendTrafficPolicy `healthCheck.passive`), for baselines.
    pub outlier_detection: Option<Value>,
    /// Cluster `commonLbConfig`, e.g. a panic threshold.
    pub common_lb_config: Option<Value>,
    /// Add `x-envoy-response-flags: %RESPONSE_FLAGS%` to responses, so load tools can tell
    /// failures apart (benchmarks only; the same for every configuration compared).
    pub expose_response_flags: bool,
    /// Cluster connect timeout (BackendTrafficPolicy `timeout.tcp.connectTimeout`); Envoy
    /// Gateway's default is 10 s.
    pub connect_timeout: Option<std::time::Duration>,
    /// Talk HTTP/2 to the endpoints, as Envoy Gateway does for GRPCRoute backends (and
    /// Backends with `appProtocol: kubernetes.io/h2c`).
    pub upstream_http2: bool,
    /// Count loopback clients as internal (HCM `internalAddressConfig`), as a mesh or an
    /// in-cluster caller would be: Envoy then keeps the `x-envoy-*` headers they send, which it
    /// strips from external clients.
    pub internal_callers: bool,
}

fn lb_least_request() -> Value {
    json!({
        "typedExtensionConfig": {
            "name": "envoy.load_balancing_policies.least_request",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                "localityLbConfig": {"localityWeightedLbConfig": {}}
            }
        }
    })
}

fn path_source(dir: &Path, file: &str) -> Value {
    json!({
        "pathConfigSource": {
            "path": dir.join(file).to_string_lossy(),
            "watchedDirectory": {"path": dir.to_string_lossy()}
        },
        "resourceApiVersion": "V3"
    })
}

pub fn eds_file(cluster: &str) -> String {
    format!("eds-{}.json", cluster.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

fn eds_cluster(dir: &Path, name: &str, lb: Value, spec: &GatewaySpec, primary: bool) -> Value {
    let mut cluster = json!({
        "name": name,
        "type": "EDS",
        "edsClusterConfig": {"edsConfig": path_source(dir, &eds_file(name)), "serviceName": name},
        "circuitBreakers": {"thresholds": [{"maxRetries": 1024}]},
        "commonLbConfig": {},
        "connectTimeout": spec.connect_timeout.map_or("10s".to_string(), |t| format!("{:.3}s", t.as_secs_f64())),
        "dnsLookupFamily": "V4_PREFERRED",
        "ignoreHealthOnHostRemoval": true,
        "loadBalancingPolicy": {"policies": [lb]},
        "perConnectionBufferLimitBytes": 32768
    });
    if spec.upstream_http2 {
        cluster["typedExtensionProtocolOptions"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {"initialConnectionWindowSize": 1048576, "initialStreamWindowSize": 65536}}
            }
        });
    }
    if primary {
        if let Some(od) = &spec.outlier_detection {
            cluster["outlierDetection"] = od.clone();
        }
        if let Some(lb) = &spec.common_lb_config {
            cluster["commonLbConfig"] = lb.clone();
        }
    }
    cluster
}

pub fn clusters(dir: &Path, spec: &GatewaySpec) -> Vec<Value> {
    let primary_lb = match &spec.endpoint_override_header {
        None => lb_least_request(),
        Some(header) => json!({
            "typedExtensionConfig": {
                "name": "envoy.load_balancing_policies.override_host",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                    // As Envoy Gateway writes it: least request, without locality weighting.
                    "fallbackPolicy": {"policies": [{"typedExtensionConfig": {
                        "name": "envoy.load_balancing_policies.least_request",
                        "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"}
                    }}]},
                    "overrideHostSources": [{"header": header}]
                }
            }
        }),
    };
    let mut out = vec![eds_cluster(dir, PRIMARY, primary_lb, spec, true)];
    if spec.fallback.is_some() {
        out.push(eds_cluster(dir, FALLBACK, lb_least_request(), spec, false));
    }
    if let Some(filter) = &spec.filter {
        let mut cluster = json!({
            "name": WASM_CLUSTER,
            "type": "STATIC",
            "connectTimeout": "10s",
            "loadAssignment": {
                "clusterName": WASM_CLUSTER,
                "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
                    "address": filter.source.server.ip().to_string(),
                    "portValue": filter.source.server.port()
                }}}}]}]
            }
        });
        if let Some(ca) = &filter.source.tls_ca {
            cluster["transportSocket"] = wasm_tls(&filter.source, ca);
        }
        out.push(cluster);
    }
    out
}

pub fn listener(dir: &Path, spec: &GatewaySpec) -> Value {
    let mut http_filters = vec![];
    if let Some(filter) = &spec.filter {
        http_filters.push(json!({
            "name": FILTER,
            "disabled": true,
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": VM_ID,
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": filter.config},
                    "vmConfig": {
                        "code": {"remote": {
                            "httpUri": {"cluster": WASM_CLUSTER, "timeout": "10s", "uri": filter.source.url},
                            "retryPolicy": {"numRetries": 10, "retryBackOff": {"baseInterval": "1s", "maxInterval": "30s"}},
                            "sha256": filter.source.sha256
                        }},
                        "runtime": "envoy.wasm.runtime.v8",
                        "vmId": VM_ID
                    }
                }
            }
        }));
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppressEnvoyHeaders": true}
    }));
    // For looking into a run: one line per request, with what each attempt did.
    let access_log = std::env::var("ENVOY_ACCESS_LOG").ok().map(|path| {
        json!([{
            "name": "envoy.access_loggers.file",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "logFormat": {"textFormatSource": {"inlineString":
                    "%START_TIME(%s.%3f)% %DURATION% %RESPONSE_CODE% %RESPONSE_FLAGS% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% \
                     host=%UPSTREAM_HOST% cluster=%UPSTREAM_CLUSTER% steer=%REQ(X-GATEWAY-DESTINATION-ENDPOINT)% \
                     fallback=%REQ(X-CHURN-GUARD-FALLBACK)% details=%RESPONSE_CODE_DETAILS%\n"}}
            }
        }])
    });
    let mut listener = json!({
        "name": LISTENER,
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
        "defaultFilterChain": {"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "commonHttpProtocolOptions": {"headersWithUnderscoresAction": "REJECT_REQUEST"},
                "http2ProtocolOptions": {"initialConnectionWindowSize": 1048576, "initialStreamWindowSize": 65536, "maxConcurrentStreams": 100},
                "httpFilters": http_filters,
                "mergeSlashes": true,
                "normalizePath": true,
                "pathWithEscapedSlashesAction": "UNESCAPE_AND_REDIRECT",
                "rds": {"configSource": path_source(dir, "rds.json"), "routeConfigName": ROUTE_CONFIG},
                "serverHeaderTransformation": "PASS_THROUGH",
                "statPrefix": "http-10080",
                "useRemoteAddress": true
            }
        }], "name": LISTENER},
        "maxConnectionsToAcceptPerSocketEvent": 1,
        "perConnectionBufferLimitBytes": 32768
    });
    if let Some(log) = access_log {
        listener["defaultFilterChain"]["filters"][0]["typedConfig"]["accessLog"] = log;
    }
    if spec.internal_callers {
        listener["defaultFilterChain"]["filters"][0]["typedConfig"]["internalAddressConfig"] =
            json!({"cidrRanges": [{"addressPrefix": "127.0.0.0", "prefixLen": 8}]});
    }
    listener
}

pub fn route_config(spec: &GatewaySpec) -> Value {
    let enable = |route: &mut Value| {
        if spec.filter.is_some() {
            route["typedPerFilterConfig"] =
                json!({FILTER: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}});
        }
    };
    let mut routes = vec![];
    if let Some(fb) = &spec.fallback {
        // Header matches take precedence over the plain rule, as in Gateway API.
        let mut r = json!({
            "match": {"prefix": "/", "headers": [{"name": fb.header, "stringMatch": {"exact": fb.value}}]},
            "name": "httproute/default/backend-fallback/rule/0/match/0/*",
            "route": {"cluster": FALLBACK, "upgradeConfigs": [{"upgradeType": "websocket"}]}
        });
        enable(&mut r);
        routes.push(r);
    }
    let mut primary = json!({
        "match": {"prefix": "/"},
        "name": "httproute/default/backend/rule/0/match/0/*",
        "route": {"cluster": PRIMARY, "upgradeConfigs": [{"upgradeType": "websocket"}]}
    });
    if let Some(retry) = &spec.route_retry_policy {
        primary["route"]["retryPolicy"] = retry.clone();
    }
    enable(&mut primary);
    routes.push(primary);
    let mut vhost = json!({"name": "envoy-gateway/gateway-1/http/*", "domains": ["*"], "routes": routes});
    if spec.expose_response_flags {
        vhost["responseHeadersToAdd"] = json!([{
            "header": {"key": "x-envoy-response-flags", "value": "%RESPONSE_FLAGS%"},
            "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"
        }]);
    }
    json!({"name": ROUTE_CONFIG, "ignorePortInHostMatching": true, "virtualHosts": [vhost]})
}

pub fn endpoints(cluster: &str, addrs: &[SocketAddr]) -> Value {
    let lb_endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({
                "endpoint": {"address": {"socketAddress": {"address": a.ip().to_string(), "portValue": a.port()}}},
                "loadBalancingWeight": 1
            })
        })
        .collect();
    json!({
        "clusterName": cluster,
        "endpoints": [{"lbEndpoints": lb_endpoints, "loadBalancingWeight": 1, "locality": {"region": format!("{cluster}/backend/0")}}]
    })
}

pub fn bootstrap(dir: &Path) -> Value {
    json!({
        "node": {"id": "churn-guard-lab", "cluster": "churn-guard-lab"},
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}},
        "dynamicResources": {"ldsConfig": path_source(dir, "lds.json"), "cdsConfig": path_source(dir, "cds.json")},
        "layeredRuntime": {"layers": [{"name": "static", "staticLayer": {"overload.global_downstream_max_connections": 50000}}]}
    })
}

/// A `DiscoveryResponse` as Envoy reads it from a watched file.
pub fn discovery_response(type_url: &str, version: u64, resources: Vec<Value>) -> Value {
    let resources: Vec<Value> = resources
        .into_iter()
        .map(|mut r| {
            if let Some(obj) = r.as_object_mut() {
                obj.insert("@type".into(), json!(type_url));
            }
            r
        })
        .collect();
    json!({"versionInfo": version.to_string(), "resources": resources})
}

/// Writes xDS files for Envoy to watch; every write is a rename, which Envoy picks up.
pub struct XdsFiles {
    pub dir: PathBuf,
    version: u64,
}

impl XdsFiles {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), version: 0 }
    }

    fn write(&mut self, file: &str, value: &Value) -> anyhow::Result<()> {
        self.version += 1;
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing xDS file {}", tmp.display()))?;
        let dest = self.dir.join(file);
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        Ok(())
    }

    pub fn write_bootstrap(&mut self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("bootstrap.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&bootstrap(&self.dir))?)
            .with_context(|| format!("writing Envoy bootstrap {}", path.display()))?;
        Ok(path)
    }

    pub fn write_gateway(&mut self, spec: &GatewaySpec) -> anyhow::Result<()> {
        let v = self.version + 1;
        let cds =
            discovery_response("type.googleapis.com/envoy.config.cluster.v3.Cluster", v, clusters(&self.dir, spec));
        self.write("cds.json", &cds)?;
        let rds = discovery_response(
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            v,
            vec![route_config(spec)],
        );
        self.write("rds.json", &rds)?;
        let lds = discovery_response(
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            v,
            vec![listener(&self.dir, spec)],
        );
        self.write("lds.json", &lds)
    }

    /// Sets the endpoints Envoy knows for `cluster` (what EDS says, stale or not).
    pub fn write_endpoints(&mut self, cluster: &str, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        let v = self.version + 1;
        let eds = discovery_response(
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            v,
            vec![endpoints(cluster, addrs)],
        );
        self.write(&eds_file(cluster), &eds)
    }
}
